"""Sidebar workspace selection and the cached workspace/extraction for pages.

The chosen model, weights, dataset and device live in ``st.session_state`` and are mirrored
in ``st.query_params`` so that a link reopens the same workspace.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import contextmanager

import numpy as np
import streamlit as st

from ..access import check_workspace
from ..config import DEMO_DATASETS, DataConfig, ModelConfig, WorkspaceConfig, default_workdir
from ..errors import CfdebugError
from .access import admitted

STATE_KEY = "cfdebug_workspace"
DEVICES = ("auto", "cpu", "cuda")
FOLDER_CHOICE = "a folder…"


def _from_query() -> WorkspaceConfig:
    q = st.query_params
    weights = q.get("weights") or None
    cfg = WorkspaceConfig(
        model=ModelConfig(name=q.get("model", "demo-cnn"), weights=weights, layer=q.get("layer") or None),
        data=DataConfig(source=q.get("data", "biased-digits")),
        device=q.get("device", "auto") if q.get("device", "auto") in DEVICES else "auto",
        workdir=default_workdir(),
    )
    if admitted(cfg):
        return cfg
    for key in ("model", "weights", "layer", "data"):  # the link asked for what this dashboard may not open
        st.query_params.pop(key, None)
    return WorkspaceConfig(workdir=default_workdir())


def current_config() -> WorkspaceConfig:
    """The applied workspace config (from the sidebar, or the URL on first load)."""
    if STATE_KEY not in st.session_state:
        st.session_state[STATE_KEY] = _from_query()
    return st.session_state[STATE_KEY]


def _sync_query(cfg: WorkspaceConfig) -> None:
    wanted = {"model": cfg.model.name, "data": cfg.data.source, "device": cfg.device}
    if cfg.model.weights:
        wanted["weights"] = cfg.model.weights
    if cfg.model.layer:
        wanted["layer"] = cfg.model.layer
    for key, value in wanted.items():
        if st.query_params.get(key) != value:
            st.query_params[key] = value
    for key in ("weights", "layer"):
        if key not in wanted and key in st.query_params:
            del st.query_params[key]


def workspace_sidebar() -> WorkspaceConfig:
    """Draw the workspace form in the sidebar; return the applied config."""
    cfg = current_config()
    with st.sidebar.form("workspace"):
        st.markdown("**Workspace**")
        model = st.text_input("Model", cfg.model.name, help="demo-cnn, or a torchvision builder name such as resnet18 or vgg16")
        weights = st.text_input("Weights (optional)", cfg.model.weights or "", help="Path to a state_dict or TorchScript file; loaded with weights_only=True")
        options = list(DEMO_DATASETS) + [FOLDER_CHOICE]
        is_demo = cfg.data.source in DEMO_DATASETS
        choice = st.selectbox("Dataset", options, index=options.index(cfg.data.source) if is_demo else len(options) - 1)
        folder = st.text_input("Dataset folder", "" if is_demo else cfg.data.source, help="ImageFolder (train/ test/ [val/]), CUB-200-2011 or CIFAR batches; used when Dataset is 'a folder…'")
        device = st.selectbox("Device", DEVICES, index=DEVICES.index(cfg.device) if cfg.device in DEVICES else 0)
        if st.form_submit_button("Load", type="primary", width="stretch"):
            source = folder.strip() if choice == FOLDER_CHOICE else choice
            if not source:
                st.error("Enter the dataset folder, or pick one of the demo datasets.")
            else:
                wanted = WorkspaceConfig(
                    model=ModelConfig(name=model.strip() or "demo-cnn", weights=weights.strip() or None, layer=cfg.model.layer),
                    data=DataConfig(source=source),
                    device=device,
                    workdir=cfg.workdir,
                )
                if admitted(wanted):  # otherwise the message shows and the current workspace stays
                    cfg = st.session_state[STATE_KEY] = wanted
    _sync_query(cfg)
    st.sidebar.caption(f"Artifacts cached in `{cfg.workdir}`")
    return cfg


def show_user_error(exc: CfdebugError) -> None:
    """Show a user mistake as ``st.error`` with the same message the CLI prints; stop the page."""
    st.error(str(exc), icon=":material/error:")
    st.stop()


def progress_callback(bar):
    """Adapt a ``st.progress`` element to the library's ``progress(fraction, message)`` callbacks."""

    def update(fraction: float, message: str) -> None:
        bar.progress(min(max(fraction, 0.0), 1.0), text=message)

    return update


_MEMO: OrderedDict = OrderedDict()
_MEMO_LOCK = threading.Lock()


def memo(key, compute, max_entries: int = 16):
    """Process-wide memo shared by all browser sessions, for work that reports progress.

    ``st.cache_data``/``st.cache_resource`` replay the elements a cached function draws, which
    breaks a progress bar created outside it; the heavy artifacts are cached on disk by the
    library anyway, this only keeps the loaded objects in memory.
    """
    with _MEMO_LOCK:
        if key in _MEMO:
            _MEMO.move_to_end(key)
            return _MEMO[key]
    value = compute()
    with _MEMO_LOCK:
        _MEMO[key] = value
        while len(_MEMO) > max_entries:
            _MEMO.popitem(last=False)
    return value


def _workspace(cfg: WorkspaceConfig, progress=None):
    from ..workspace import Workspace

    return memo(("workspace", cfg), lambda: Workspace(cfg, progress), max_entries=4)


@contextmanager
def _status(label: str):
    with st.status(label, expanded=False) as status:
        bar = st.progress(0.0)
        yield status, progress_callback(bar)
        status.update(state="complete", expanded=False)


def load_workspace(cfg: WorkspaceConfig | None = None):
    """The cached :class:`cfdebug.workspace.Workspace`; training the demo model shows progress."""
    cfg = cfg or current_config()
    try:
        check_workspace(cfg)  # every way into session state (URL, Load, a page's button) meets the same check
        with _status("Loading model and data (the demo model trains on first use, ~20 s)…") as (status, progress):
            ws = _workspace(cfg, progress)
            status.update(label=f"{ws.config.model.name} on {ws.data.name}")
        return ws
    except CfdebugError as exc:
        show_user_error(exc)


def extraction(ws, split: str):
    """The cached extraction of ``split`` (computed with a progress bar on a miss)."""
    try:
        if ws.store.exists(ws.extractions.KIND, ws.extractions.key(split)):
            return ws.extractions.get(split)
        bar = st.progress(0.0, text=f"Extracting features of the {split} split…")
        ex = ws.extractions.get(split, progress_callback(bar))
        bar.empty()
        return ex
    except CfdebugError as exc:
        show_user_error(exc)


def workspace_page():
    """What every page starts with: the workspace sidebar, then the loaded workspace.

    The sidebar is drawn by the page (not by ``app.py``) so that a page rerun, in the
    browser or under ``AppTest``, always draws it with the page.
    """
    st.sidebar.title("cfdebug")
    st.sidebar.caption("Why does my classifier fail, and how do I fix it?")
    return load_workspace(workspace_sidebar())


def class_names(ws) -> list[str]:
    return list(ws.data.classes)


def sample_images(ws, split: str, indices) -> list[np.ndarray]:
    """Images ``[H, W, 3]`` uint8 at their stored size for display."""
    try:
        return [ws.data.splits[split].load_image(int(i)) for i in indices]
    except CfdebugError as exc:
        show_user_error(exc)
