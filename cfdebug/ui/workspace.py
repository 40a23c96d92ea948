"""Sidebar workspace selection and the cached workspace/extraction for pages.

The chosen model, weights, dataset, input size, mean/std, target layer and device live in
``st.session_state`` and are mirrored in ``st.query_params`` so that a link reopens the same
workspace.

Work that is not cached yet (training the model, extracting features, fitting the CFE heads)
runs as a background *prepare* run (:func:`cfdebug.jobs.run_prepare_job`, started by
:func:`cfdebug.runs.start_background_run`, which joins a run already making the same thing):
the page shows its progress in a polled fragment and stops there; the sidebar and the other
pages stay usable, closing the tab does not stop the run, and the page (or the next visitor)
picks the result up from the cache. Cache hits are read in-process at once. A read-only
dashboard computes nothing: it shows what is cached, a run the owner started, or says that
what the page needs is not there.

The applied workspace is written to the session state by :func:`set_workspace` alone.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import streamlit as st

from ..access import allowed_roots, check_workspace, image_allowed, owner_folders, read_only, remember_owner_folder, shared, workspace_paths
from ..config import DEMO_DATASETS, DEVICE_CHOICES, DataConfig, ModelConfig, WorkspaceConfig, default_workdir
from ..errors import CfdebugError
from .cache import memo
from .errors import show_error, show_user_error
from .runs import run_failure, run_monitor

STATE_KEY = "cfdebug_workspace"
LAST_GOOD_KEY = "cfdebug_workspace_loaded"
FAILURES_KEY = "cfdebug_job_failures"
TRAINING_KEY = "cfdebug_training"
#: The workspaces the owner of a personal dashboard typed in the sidebar (opened wherever they are).
TYPED_KEY = "cfdebug_typed"
DEVICES = DEVICE_CHOICES
FOLDER_CHOICE = "a folder…"
#: ``CFDEBUG_DASHBOARD_INLINE=1``: compute missing artifacts in the page's own thread instead of a
#: background run (AppTest has no fragment timers to poll a run with; the tests set it).
INLINE_ENV = "CFDEBUG_DASHBOARD_INLINE"
#: The URL's workspace parameters (:func:`_sync_query`).
QUERY_KEYS = ("model", "weights", "layer", "data", "size", "mean", "std", "device")
#: What a read-only page says instead of computing what it needs.
NOT_CACHED_NOTICE = ("{what}: not computed on this dashboard yet, and a read-only dashboard computes nothing (a visitor "
                     "browses what is cached). Open another page or preset workspace, or run cfdebug yourself (`make demo`).")
#: Shown in place of an image whose file lies outside the allowed folders (:func:`cfdebug.access.image_allowed`).
WITHHELD_IMAGE = np.full((32, 32, 3), 128, dtype=np.uint8)


def rgb_text(values) -> str:
    return ",".join(f"{v:g}" for v in values) if values else ""


def _data_fields(size: str, mean: str, std: str) -> dict:
    """``DataConfig`` fields from the sidebar's (or the URL's) text; a blank one keeps the
    dataset's default. The config itself checks the ranges."""
    fields = {}
    if size.strip():
        if not size.strip().isdigit():
            raise CfdebugError(f"Expected `data.input_size` to be a whole number of pixels (e.g. 32), but got {size!r}; leave it blank for the dataset's default.")
        fields["input_size"] = int(size)
    for name, text in (("mean", mean), ("std", std)):
        if text.strip():
            try:
                fields[name] = tuple(float(v) for v in text.split(","))
            except ValueError:
                raise CfdebugError(f"Expected `data.{name}` as three comma-separated numbers (R,G,B), but got {text!r}; leave it blank for the dataset's default.") from None
    return fields


def _from_query() -> WorkspaceConfig:
    q = st.query_params
    weights = q.get("weights") or None
    cfg = WorkspaceConfig(
        model=ModelConfig(name=q.get("model", "demo-cnn"), weights=weights, layer=q.get("layer") or None),
        data=DataConfig(source=q.get("data", "biased-digits"), **_data_fields(q.get("size", ""), q.get("mean", ""), q.get("std", ""))),
        device=q.get("device", "auto") if q.get("device", "auto") in DEVICES else "auto",
        workdir=default_workdir(),
    )
    refusal = refused(cfg)
    if refusal is None:
        return cfg
    show_error(refusal)
    for key in QUERY_KEYS:  # the link asked for what this dashboard may not open
        st.query_params.pop(key, None)
    return WorkspaceConfig(workdir=default_workdir())


def current_config() -> WorkspaceConfig:
    """The applied workspace config (from the sidebar, or the URL on first load; a link whose
    parameters are not valid shows the error and opens the default workspace)."""
    if STATE_KEY not in st.session_state:
        try:
            set_workspace(_from_query(), sync=False)
        except CfdebugError as exc:
            show_error(f"The link's workspace could not be opened: {exc}")
            set_workspace(WorkspaceConfig(workdir=default_workdir()))
    return st.session_state[STATE_KEY]


def set_workspace(cfg: WorkspaceConfig, *, sync: bool = True) -> None:
    """Apply ``cfg``: the one writer of the session's workspace, mirrored in the URL (``sync``)."""
    st.session_state[STATE_KEY] = cfg
    if sync:
        _sync_query(cfg)


def _sync_query(cfg: WorkspaceConfig) -> None:
    optional = {
        "weights": cfg.model.weights, "layer": cfg.model.layer, "size": str(cfg.data.input_size or ""),
        "mean": rgb_text(cfg.data.mean), "std": rgb_text(cfg.data.std),
    }
    wanted = {"model": cfg.model.name, "data": cfg.data.source, "device": cfg.device}
    wanted.update({key: value for key, value in optional.items() if value})
    for key, value in wanted.items():
        if st.query_params.get(key) != value:
            st.query_params[key] = value
    for key in optional:
        if key not in wanted and key in st.query_params:
            del st.query_params[key]


def workspace_sidebar() -> WorkspaceConfig:
    """Draw the workspace form in the sidebar; return the applied config. A message about what was
    typed (a folder this dashboard may not open, a malformed field) shows at the top of the page,
    not at the foot of the sidebar."""
    cfg = current_config()
    messages = []
    with st.sidebar.form("workspace"):
        st.markdown("**Workspace**")
        model = st.text_input("Model", cfg.model.name, help="demo-cnn, or a torchvision builder name such as resnet18 or vgg16")
        weights = st.text_input("Weights (optional)", cfg.model.weights or "", help="Path to a state_dict or TorchScript file; loaded with weights_only=True")
        options = list(DEMO_DATASETS) + [FOLDER_CHOICE]
        is_demo = cfg.data.source in DEMO_DATASETS
        choice = st.selectbox("Dataset", options, index=options.index(cfg.data.source) if is_demo else len(options) - 1)
        folder = st.text_input("Dataset folder", "" if is_demo else cfg.data.source, help="ImageFolder (train/ test/ [val/]), CUB-200-2011 or CIFAR batches; used when Dataset is 'a folder…'")
        size, mean, std, layer = _preprocessing_inputs(cfg)
        device = st.selectbox("Device", DEVICES, index=DEVICES.index(cfg.device) if cfg.device in DEVICES else 0)
        if st.form_submit_button("Load", type="primary", width="stretch"):
            source = folder.strip() if choice == FOLDER_CHOICE else choice
            if not source:
                messages.append("Enter the dataset folder, or pick one of the demo datasets.")
            else:
                try:
                    wanted = WorkspaceConfig(
                        model=ModelConfig(name=model.strip() or "demo-cnn", weights=weights.strip() or None, layer=layer.strip() or None),
                        data=DataConfig(source=source, **_data_fields(size, mean, std)),
                        device=device,
                        workdir=cfg.workdir,
                    )
                    refusal = refused(wanted, typed=True)
                    if refusal is None:
                        cfg = wanted
                        set_workspace(cfg, sync=False)
                    else:  # the message shows and the current workspace stays
                        messages.append(refusal)
                except CfdebugError as exc:
                    messages.append(str(exc))
    for message in messages:
        show_error(message)
    _sync_query(cfg)
    if not read_only():  # a server path
        st.sidebar.caption(f"Artifacts cached in `{cfg.workdir}`")
    return cfg


def _preprocessing_inputs(cfg: WorkspaceConfig) -> tuple[str, str, str, str]:
    """The form's input size, mean, std and target layer fields (blank: the defaults they name)."""
    d = cfg.data
    size = st.text_input("Input size", str(d.input_size or ""), placeholder="default: 32 digits/CIFAR · 224 folders/CUB",
                         help="Image side in pixels after resizing. Blank: 32 for the digits and CIFAR, 224 for image folders and CUB. "
                              "A small model trains much faster at 32 or 64 px than at 224 on a CPU.")
    mean = st.text_input("Mean", rgb_text(d.mean), placeholder="default: 0.5,0.5,0.5 digits/CIFAR · ImageNet's",
                         help="Normalisation mean, R,G,B. Blank: 0.5,0.5,0.5 for the digits and CIFAR, ImageNet's 0.485,0.456,0.406 otherwise.")
    std = st.text_input("Std", rgb_text(d.std), placeholder="default: 0.25,0.25,0.25 digits/CIFAR · ImageNet's",
                        help="Normalisation std, R,G,B. Blank: 0.25,0.25,0.25 for the digits and CIFAR, ImageNet's 0.229,0.224,0.225 otherwise.")
    layer = st.text_input("Target layer", cfg.model.layer or "", placeholder="default: the last conv block",
                          help="Module name whose filters are analysed (e.g. layer4 for a ResNet). Blank: the last convolutional block, found automatically.")
    return size, mean, std, layer


def server_address() -> str | None:
    """The address Streamlit listens on (``server.address``; ``None``: every interface)."""
    return st.get_option("server.address") or None


def refused(cfg: WorkspaceConfig, *, typed: bool = False) -> str | None:
    """Why a visitor may not open ``cfg`` (:func:`cfdebug.access.check_workspace`: allowed roots,
    read-only presets, a personal or a shared dashboard), or ``None`` when they may. On a personal
    dashboard a ``typed`` workspace opens wherever its paths are; they are remembered in the
    workdir (a reload or a link reopens them) and for this session."""
    try:
        check_workspace(cfg, address=server_address(), typed=typed or cfg in st.session_state.get(TYPED_KEY, ()))
    except CfdebugError as exc:
        return str(exc)
    if typed and not shared(server_address()):
        st.session_state.setdefault(TYPED_KEY, set()).add(cfg)
        for path, _ in workspace_paths(cfg):
            try:
                remember_owner_folder(cfg.workdir, path)
            except (OSError, CfdebugError):
                pass  # a read-only workdir: this session still opens it
    return None


def progress_callback(bar):
    """Adapt a ``st.progress`` element to the library's ``progress(fraction, message)`` callbacks."""

    def update(fraction: float, message: str) -> None:
        bar.progress(min(max(fraction, 0.0), 1.0), text=message)

    return update


def inline() -> bool:
    """Whether missing artifacts are computed in the page's thread (:data:`INLINE_ENV`); never
    in read-only mode, which computes nothing."""
    return os.environ.get(INLINE_ENV) == "1" and not read_only()


def _workspace(cfg: WorkspaceConfig, progress=None):
    from ..workspace import Workspace

    # Outside inline mode a model that must be trained raises ModelNotTrained: a prepare run trains it.
    return memo(("workspace", cfg), lambda: Workspace(cfg, progress, cached_only=not inline()), max_entries=4)


def _stages_reached(record, through: str, detect_seeds=(0,)) -> bool:
    """Whether ``record`` (a prepare run) was asked to make everything up to ``through`` (and, for
    detection, every CFE seed of ``detect_seeds``)."""
    from ..jobs import PREPARE_STAGES

    config = record.config or {}
    asked = config.get("through", "load")
    seeds = set(config.get("detect_seeds", [0]))
    return PREPARE_STAGES.index(asked) >= PREPARE_STAGES.index(through) and (through != "detect" or set(detect_seeds) <= seeds)


def _remember_outcome(record, key: str, through: str, ready: Callable[[object], bool], what: str, detect_seeds=(0,)) -> None:
    """A prepare run ended (or made what the page needs): keep a failed, cancelled or fruitless
    run's message in the session for :func:`await_prepare` to return on the next page run."""
    failures = st.session_state.setdefault(FAILURES_KEY, {})
    if record.status in ("failed", "cancelled"):
        failures[key] = run_failure(record, what)
    elif record.status == "done" and not ready(record) and _stages_reached(record, through, detect_seeds):
        where = "" if read_only() else f" ({record.log_path})"
        failures[key] = f"{what}: run {record.run_id} finished, but its results are not in the cache; see its log{where}."


def await_prepare(cfg: WorkspaceConfig, through: str, ready: Callable[[object], bool], what: str, *, train: bool = False, stop: bool = True,
                  detect_seeds=(0,), extras: Callable | None = None) -> str | None:
    """Start (or join) the prepare run of ``cfg`` up to ``through`` and show its progress
    (``detect_seeds``: the CFE seeds its detection stage scores; ``extras``: the monitor's
    page-specific parts, :func:`~cfdebug.ui.runs.run_monitor`).

    Returns the message of the session's last run for the same key when it failed or was
    cancelled (and forgets it, so the next call tries again); otherwise shows the run's
    :func:`~cfdebug.ui.runs.run_monitor` and stops the page (``stop=False``: returns ``None``
    and the page goes on). Read-only: never starts a run; a run already making it is shown,
    else :data:`NOT_CACHED_NOTICE`.
    """
    from ..jobs import prepare_spec
    from ..runs import RunRegistry, start_background_run

    try:
        spec = prepare_spec(cfg, through, train=train, detect_seeds=detect_seeds)
        failure = st.session_state.setdefault(FAILURES_KEY, {}).pop(spec["key"], None)
        if failure is not None:
            return failure
        if read_only():
            active = RunRegistry(cfg.workdir).find_active("prepare", spec["key"])
            if active is None:
                st.info(NOT_CACHED_NOTICE.format(what=what), icon=":material/lock:")
                st.stop()
            run_id = active.run_id
        else:
            run_id = start_background_run(cfg.workdir, "prepare", spec)
    except CfdebugError as exc:
        return str(exc)
    run_monitor(cfg.workdir, run_id, what, ready=ready, extras=extras,
                on_end=lambda record: _remember_outcome(record, spec["key"], through, ready, what, detect_seeds))
    if stop:
        st.stop()
    return None


def _fall_back(cfg: WorkspaceConfig, message: str, may_fall_back: bool):
    """A failed load: say why (in widget terms), then open the last workspace that loaded (or the
    default) and put it back in the URL, so no stale status line or parameter stays behind."""
    show_error(message)
    previous = st.session_state.get(LAST_GOOD_KEY) or WorkspaceConfig(workdir=cfg.workdir)
    if not may_fall_back or previous == cfg:
        st.stop()
    set_workspace(previous)
    st.caption(f"Showing the previous workspace, {previous.model.name} on {previous.data.source}, instead.")
    return load_workspace(previous, may_fall_back=False)


def load_workspace(cfg: WorkspaceConfig | None = None, *, may_fall_back: bool = True):
    """The cached :class:`cfdebug.workspace.Workspace`. A model that must be trained first is
    trained by a background prepare run (with progress; the page stops until it is ready); a
    failed load shows its error and falls back to the previous workspace."""
    from ..workspace import ModelNotTrained

    cfg = cfg or current_config()
    bar = st.empty()
    try:
        refusal = refused(cfg)  # every way into session state (URL, Load, a page's button) meets the same check
        if refusal is not None:
            raise CfdebugError(refusal)
        ws = _workspace(cfg, progress_callback(bar) if inline() else None)
    except ModelNotTrained:
        what = f"Training {cfg.model.name} on {cfg.data.source}"
        failure = await_prepare(cfg, "extract", lambda record: (record.progress or {}).get("stage") not in (None, "load"), what)
        return _fall_back(cfg, failure, may_fall_back)
    except CfdebugError as exc:
        bar.empty()
        return _fall_back(cfg, str(exc), may_fall_back)
    bar.empty()
    st.session_state[LAST_GOOD_KEY] = cfg
    return ws


def extraction(ws, split: str):
    """The cached extraction of ``split``; on a miss a background prepare run extracts every split."""
    try:
        cached = ws.store.exists(ws.extractions.KIND, ws.extractions.key(split))
        if cached:
            return ws.extractions.get(split)
        if not inline():
            ready = lambda record: ws.store.exists(ws.extractions.KIND, ws.extractions.key(split))  # noqa: E731
            show_user_error(CfdebugError(await_prepare(ws.config, "extract", ready, f"Extracting the features of {ws.data.name}")))
        bar = st.progress(0.0, text=f"Extracting features of the {split} split…")
        ex = ws.extractions.get(split, progress_callback(bar))
        bar.empty()
        return ex
    except CfdebugError as exc:
        show_user_error(exc)


#: The engine's epoch-end progress line (:func:`cfdebug.training.run_epochs`): a prepare run that
#: trains the model logs its epochs as these lines only (it keeps no epoch rows of its own).
_EPOCH_LINE = re.compile(r"epoch (\d+)/\d+: loss ([-0-9.e+]+)(?:, train acc ([0-9.]+))?(?:, val acc ([0-9.]+))?")


def training_epochs(workdir, run_id: str) -> list[dict]:
    """A Train run's epochs so far, ``[{"part", "epoch", "loss", "train_acc", "val_acc"}]``, read
    from its progress lines (:data:`_EPOCH_LINE`), one row per epoch."""
    from ..runs import RunRegistry

    rows = {}
    for _, row in RunRegistry(workdir).timed_progress(run_id):
        match = _EPOCH_LINE.search(str(row.get("message", "")))
        if match:
            epoch, loss, train_acc, val_acc = match.groups()
            rows[int(epoch)] = {"part": "training", "epoch": int(epoch), "loss": float(loss),
                                **({"train_acc": float(train_acc)} if train_acc else {}), **({"val_acc": float(val_acc)} if val_acc else {})}
    return [rows[e] for e in sorted(rows)]


def _training_curves(workdir):
    """The Train run monitor's extras: loss and validation accuracy per epoch so far."""
    from .. import viz

    def draw(record, progress) -> None:
        rows = training_epochs(workdir, record.run_id)
        if rows:
            st.plotly_chart(viz.training_curves(rows, "Training so far: loss and validation accuracy per epoch"), width="stretch",
                            key=f"train-curves-{record.run_id}")

    return draw


def _trained_history(ws) -> list[dict]:
    """The finished Train run's per-epoch history (the trained model's stored metadata)."""
    try:
        meta = ws.store.load_meta("models", ws.trained_model_key())
    except (OSError, ValueError, KeyError, CfdebugError):
        return []
    return [{**row, "part": "training"} for row in meta.get("history") or []]


def training_history(ws) -> list[dict]:
    """How the open model was trained, one row per epoch (``part="training"``), when cfdebug trained
    it: the shipped demo models and a model trained here (its metadata, or the store entry its
    weights file lies in, as after *Train on this data*); ``[]`` for a checkpoint from elsewhere."""
    history = (ws.model_meta or {}).get("history")
    weights = ws.config.model.weights
    if not history and weights:
        path = Path(os.path.realpath(weights))
        models = Path(os.path.realpath(ws.store.path("models", "x"))).parent
        if path.name == "model.pt" and path.parent.parent == models:
            try:
                history = ws.store.load_meta("models", path.parent.name).get("history")
            except (OSError, ValueError, KeyError, CfdebugError):
                history = None
    return [{**row, "part": "training"} for row in history or []]


def random_weights_banner(ws) -> None:
    """The warning every page shows for a model with random weights, with the Train action (not
    in read-only mode)."""
    from ..jobs import prepare_key
    from ..runs import RunRegistry

    cfg = ws.config
    trained = ws.trained_weights_path()
    st.warning(
        f"**{cfg.model.name} has random weights.** No weights were given, so it predicts at chance level (about "
        f"{100 / ws.data.num_classes:.0f}% accuracy on {ws.data.num_classes} classes) and nothing these pages show says anything "
        "about a real model. Give a checkpoint in the sidebar's **Weights**, or train it on this dataset.",
        icon=":material/warning:",
    )
    if read_only():
        return
    if trained.is_file():
        history = _trained_history(ws)
        if history:
            from .. import viz

            with st.expander("Training curves of the weights trained on this data", expanded=True):
                st.plotly_chart(viz.training_curves(history, "Loss and accuracy per epoch (the best epoch on validation is kept)"),
                                width="stretch")
        if st.session_state.get(TRAINING_KEY) == cfg or st.button("Use the weights trained on this data", type="primary"):
            st.session_state.pop(TRAINING_KEY, None)
            use_weights(cfg, trained)
        return
    active = RunRegistry(cfg.workdir).find_active("prepare", prepare_key(cfg, train=True))
    if active is None and not st.button("Train on this data", type="primary"):
        slow = " On a CPU at 224 px this is slow: a smaller **Input size** (sidebar) trains much faster." if ws.data.input_size >= 128 else ""
        st.caption(f"Trains {cfg.model.name} from its random start for {cfg.train.epochs} epochs on the training split "
                   f"({len(ws.data.splits['train'])} images at {ws.data.input_size} px; the best epoch on validation is kept) "
                   f"as a background run, then opens the trained weights.{slow}")
        return
    st.session_state[TRAINING_KEY] = cfg
    failure = await_prepare(cfg, "load", lambda record: trained.is_file(), f"Training {cfg.model.name} on {ws.data.name}", train=True, stop=False,
                            extras=_training_curves(cfg.workdir))
    if failure is not None:
        st.session_state.pop(TRAINING_KEY, None)
        show_error(failure)


def use_weights(cfg: WorkspaceConfig, path) -> None:
    """Open ``cfg`` with the weights at ``path`` (a trained or treated model) and rerun the page."""
    set_workspace(replace(cfg, model=replace(cfg.model, weights=str(path))))
    st.rerun()


def class_names(ws) -> list[str]:
    return list(ws.data.classes)


def _image_roots(ws) -> list:
    """Where an image the workspace shows may lie: the allowed roots and the workspace's own dataset
    folder (admitted already: inside a root, or typed by the owner of a personal dashboard), and on
    a personal dashboard the folders its owner opened."""
    cfg = ws.config
    extra = [path for path, what in workspace_paths(cfg) if what == "dataset folder"]
    if not shared(server_address()):
        extra += owner_folders(cfg.workdir)
    return allowed_roots(extra)


def shown(ws, split: str, i: int, roots: list | None = None) -> bool:
    """Whether image ``i`` of ``split`` may be shown: an embedded image, or a file that resolves
    inside ``roots`` (default :func:`_image_roots`; :func:`cfdebug.access.image_allowed`: a
    symlink inside an allowed dataset may point anywhere)."""
    paths = ws.data.splits[split].paths
    return paths is None or image_allowed(paths[int(i)], _image_roots(ws) if roots is None else roots)


def sample_images(ws, split: str, indices) -> list[np.ndarray]:
    """Images ``[H, W, 3]`` uint8 at their stored size for display; one that may not be shown
    (:func:`shown`) is :data:`WITHHELD_IMAGE`. Every image a page shows comes from here."""
    roots = None if ws.data.splits[split].paths is None else _image_roots(ws)
    try:
        return [ws.data.splits[split].load_image(int(i)) if shown(ws, split, i, roots) else WITHHELD_IMAGE for i in indices]
    except CfdebugError as exc:
        show_user_error(exc)
