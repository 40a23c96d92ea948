"""Background-run entry points: one per run kind, called alike by the CLI, ``torchrun`` and the dashboard.

A run's *spec* is the JSON its ``run.json`` holds under ``config`` (:meth:`RunRegistry.create`):

* ``treat``: ``{"workspace": config_dict(WorkspaceConfig), "treatment": config_dict(TreatmentSchedule),
  "lambdas1": [float], "lambdas2": [float], "seeds": [int]}`` (:func:`treat_spec`): the loss weights
  live in the grids only;
* ``xcr``: ``{"workspace": config_dict(WorkspaceConfig), "xcr": config_dict(XCRConfig)}`` (:func:`xcr_spec`);
* ``revise``: ``{"workspace": config_dict(WorkspaceConfig), "revise": config_dict(ReviseConfig),
  "declaration": {"method", "region", "filters"}, "seeds": [int], "budget": float}`` (:func:`revise_spec`);
* ``prepare``: ``{"workspace": config_dict(WorkspaceConfig), "train": bool, "through": stage, "key": str}``
  (:func:`prepare_spec`): open the workspace (training its model when needed, or when ``train``),
  then make the cached artifacts the dashboard's pages read, up to ``through``.

:func:`run_treat_job`, :func:`run_xcr_job` and :func:`run_prepare_job` take a spec, run it as a
registry run (status, progress, cancel, resume from checkpoints) and return the result dict; they
print nothing. :func:`start_background_run` (in :mod:`cfdebug.runs`) starts any kind as
``python -m cfdebug <kind> --config run.json --run-id ID``, which ends in these functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from .config import TreatmentSchedule, WorkspaceConfig, check_choice, check_real, check_sweep_schedule, config_dict, workspace_config_from_dict, xcr_config_from_dict
from .errors import CfdebugError
from .store import stable_hash

if TYPE_CHECKING:  # runtime imports torch; this module stays cheap to import (the dashboard builds specs with it)
    from .runtime import Progress

__all__ = [
    "RUN_KINDS",
    "read_run_spec",
    "treat_spec",
    "xcr_spec",
    "PREPARE_STAGES",
    "prepare_key",
    "prepare_spec",
    "prepared",
    "run_treat_job",
    "run_xcr_job",
    "run_prepare_job",
    "revise_spec",
    "run_revise_job",
    "prediction_changes",
]

RUN_KINDS = ("treat", "xcr", "revise", "prepare")


def treat_spec(workspace: WorkspaceConfig, schedule: TreatmentSchedule, lambdas1: Sequence[float], lambdas2: Sequence[float], seeds: Sequence[int]) -> dict:
    """The spec of a treatment sweep: every (λ1, λ2) in ``lambdas1 × lambdas2`` and the control, per seed.

    ``schedule`` is what the runs share (a :class:`TreatmentSchedule`: no loss weights, so the
    grids are their one source; its ``seed`` is replaced by each of ``seeds``). Each λ is
    checked to be in ``[0, 1]`` now, before a run is registered.
    """
    check_sweep_schedule(schedule)
    lambdas1 = [check_real(v, "lambdas1", 0.0, 1.0) for v in lambdas1]
    lambdas2 = [check_real(v, "lambdas2", 0.0, 1.0) for v in lambdas2]
    seeds = [int(v) for v in seeds]
    if not (lambdas1 and lambdas2 and seeds):
        raise CfdebugError("Expected at least one value each for `lambdas1`, `lambdas2` and `seeds`, but one of them is empty.")
    return {"workspace": config_dict(workspace), "treatment": config_dict(schedule), "lambdas1": lambdas1, "lambdas2": lambdas2, "seeds": seeds}


def xcr_spec(workspace: WorkspaceConfig, xcr) -> dict:
    """The spec of an XCR report run (``xcr``: an :class:`~cfdebug.config.XCRConfig`)."""
    return {"workspace": config_dict(workspace), "xcr": config_dict(xcr)}


def read_run_spec(path: str | Path) -> tuple[dict, str | None]:
    """``(spec, run_id)`` from a run's ``run.json`` (``{"kind", "run_id", "config"}``) or a file holding a bare spec (run id ``None``)."""
    path = Path(path)
    if not path.is_file():
        raise CfdebugError(f"Expected a run config file (a run's run.json), but {path} does not exist; check the `config` path.")
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CfdebugError(f"Expected {path} to be a readable JSON run config, but reading it failed ({exc}); pass a run's run.json.") from None
    if not isinstance(payload, dict):
        raise CfdebugError(f"Expected {path} to hold a JSON object, but it holds a {type(payload).__name__}; pass a run's run.json.")
    return payload.get("config", payload), payload.get("run_id")


# --------------------------------------------------------------------------------------------
# treat
# --------------------------------------------------------------------------------------------


#: Keys a treat spec's ``treatment`` held before it was a :class:`TreatmentSchedule` (the first
#: pair of the grids, a copy of ``lambdas1[0]``/``lambdas2[0]``); dropped when such a run resumes.
_OLD_SPEC_WEIGHTS = ("lambda1", "lambda2")


def _parse_treat_spec(spec: dict) -> tuple[WorkspaceConfig, TreatmentSchedule, list, list, list]:
    try:
        schedule = {k: v for k, v in spec["treatment"].items() if k not in _OLD_SPEC_WEIGHTS}
        return (
            workspace_config_from_dict(spec["workspace"]),
            TreatmentSchedule(**schedule),
            list(spec["lambdas1"]), list(spec["lambdas2"]), list(spec["seeds"]),
        )
    except (KeyError, TypeError) as exc:
        raise CfdebugError(f"The run config is not a treatment config ({exc}). Start a new run instead.") from None


def run_treat_job(
    spec: dict,
    *,
    registry=None,
    run_id: str | None = None,
    progress: Progress | None = None,
    on_start: Callable[[str, object], None] | None = None,
) -> dict | None:
    """Run a treatment sweep (:func:`~cfdebug.treatment.treatment_sweep`) as a registry run.

    Under ``torchrun`` every rank trains (DDP) and rank 0 alone writes the registry, checkpoints
    and the result; without it this is one process. Rank 0 turns ``SIGTERM`` (sent by
    :func:`~cfdebug.runs.cancel`) into the run's cancel flag, which every rank polls each step.

    Args:
        spec: a treat spec (:func:`treat_spec`).
        registry: the :class:`~cfdebug.runs.RunRegistry` (default: the one of the spec's workdir).
        run_id: the registered run to run (created, queued, by :meth:`RunRegistry.create` or
            :func:`~cfdebug.runs.start_background_run`); ``None`` registers a new one. A run with
            checkpoints resumes from them.
        progress: ``progress(fraction, message)`` on rank 0 (loading the workspace, then the sweep).
        on_start: called on rank 0 as ``on_start(run_id, workspace)`` once the run is registered
            and its workspace loaded (the CLI prints where the run lives and how to resume it).

    Returns:
        On rank 0, :func:`~cfdebug.treatment.treatment_sweep`'s dict plus ``run_id``, ``classes``,
        ``world_size``, ``flagged_churn`` (detection on the base vs the best treated model, first
        seed) and ``best_test`` (:func:`prediction_changes` of that model on the test split, plus
        ``control_test_predictions`` [N] of the same seed's CE control); the
        result is also stored in the registry. ``None`` on the other ranks and when the run was
        cancelled (the registry records it).
    """
    from .distributed import init_distributed, shutdown
    from .runs import RunCancelled, RunRegistry

    try:
        parsed = _parse_treat_spec(spec)
    except CfdebugError as exc:
        if registry is not None and run_id is not None:
            registry.set_status(run_id, "failed", error=str(exc))
        raise
    registry = registry if registry is not None else RunRegistry(parsed[0].workdir)
    ctx = init_distributed(parsed[0].device)  # a no-op unless started by torchrun
    try:
        return _treat(ctx, registry, run_id, spec, parsed, progress, on_start)
    except RunCancelled:
        if ctx.is_main:
            raise
        return None
    finally:
        shutdown()


def _treat(ctx, registry, run_id: str | None, spec: dict, parsed: tuple, progress: Progress | None, on_start) -> dict | None:
    """The body of :func:`run_treat_job` on every rank: register (rank 0), run, store (rank 0).
    Rank 0 reports the stages of :data:`TREAT_SPANS` to the registry and to ``progress``."""
    from .distributed import broadcast_object, main_first
    from .runs import RunStages, run_context
    from .runtime import scaled_progress
    from .treatment import training_sets, treatment_sweep
    from .workspace import Workspace

    ws_config, schedule, lambdas1, lambdas2, seeds = parsed
    if run_id is None:
        run_id = registry.create("treat", spec).run_id if ctx.is_main else None
    run_id = broadcast_object(run_id)
    ws_config = dataclasses.replace(ws_config, device=str(ctx.device))
    if ctx.is_main and ctx.distributed:
        # torchrun gives each worker its own session, so cancel() signals rank 0 only: turn
        # its SIGTERM into the registry's cancel flag, which every rank checks each step.
        signal.signal(signal.SIGTERM, lambda *_: registry.request_cancel(run_id))
    log = (lambda row: registry.log_progress(run_id, row)) if ctx.is_main else None
    stages = RunStages(TREAT_SPANS, log, progress if ctx.is_main else None)
    guard = run_context(registry, run_id, handle_sigterm=not ctx.distributed) if ctx.is_main else contextlib.nullcontext()
    result = None  # stays None when run_context ends the run as cancelled
    with guard:
        with main_first():  # rank 0 trains/extracts into the cache, the others then read it
            ws = Workspace(ws_config, scaled_progress(stages.stage("load", "Loading the model and data"), 0.0, 1.0, "training: "))
            sets = training_sets(ws, stages.stage("sets", "Global MC sets (CFE heads)"))
        sets = broadcast_object(sets)
        if ctx.is_main and on_start is not None:
            on_start(run_id, ws)
        result = treatment_sweep(
            ws, lambdas1, lambdas2, seeds, sets, progress=stages.stage("sweep", "Treatment sweep"),
            schedule=schedule, run_dir=registry.run_dir(run_id), registry=registry, run_id=run_id,
        )
        result = {"run_id": run_id, "classes": list(ws.data.classes), "world_size": ctx.world_size, **result}
        if not ctx.is_main:
            return None
        detect = stages.stage("detect", "Detection on the treated model")
        result.update(_best_model_changes(ws, registry.run_dir(run_id), result, seeds[0], detect))
        detect(1.0, "done")
        registry.set_result(run_id, result)
    return result


def _best_model_changes(ws, run_dir: Path, result: dict, seed: int, progress: Progress | None) -> dict:
    """Detection on the base model vs recomputed on the best treated model (``seed``):
    ``{"flagged_churn": …, "best_test": …}`` (see :func:`run_treat_job`)."""
    from .detect import run_detection
    from .treatment import flagged_churn, sweep_run_dir
    from .workspace import Workspace

    best = result["best"]
    weights = sweep_run_dir(run_dir, "treatment", best["lambda1"], best["lambda2"], seed) / "model.pt"
    ws_config = ws.config
    treated_cfg = dataclasses.replace(ws_config, model=dataclasses.replace(ws_config.model, weights=str(weights)))
    if progress:
        progress(0.0, "recomputing detection on the treated model for the flagged-set churn")
    before, after = run_detection(ws), run_detection(Workspace(treated_cfg))
    which = {"lambda1": best["lambda1"], "lambda2": best["lambda2"], "seed": seed, "weights": str(weights)}
    churn = flagged_churn(before, after)
    churn.update(which)
    changes = prediction_changes(before, after, ws.data.num_classes)
    # The control of the same seed, so a page can show what the losses changed beyond fine-tuning
    # (treated − control); its test predictions only, no detection.
    control_weights = sweep_run_dir(run_dir, "fine-tuned", 0.0, 0.0, seed) / "model.pt"
    if control_weights.is_file():
        control_cfg = dataclasses.replace(ws_config, model=dataclasses.replace(ws_config.model, weights=str(control_weights)))
        changes["control_test_predictions"] = Workspace(control_cfg).extractions.get("test").preds.astype(np.int64).tolist()
        changes["control_weights"] = str(control_weights)
    return {"flagged_churn": churn, "best_test": {**which, **changes}}


def prediction_changes(before: dict, after: dict, num_classes: int) -> dict:
    """How a model's predictions on a split changed, from two :func:`~cfdebug.detect.run_detection`
    reports on the same images (``before``: the base model, ``after``: the treated one).

    Returns lists (JSON-ready): ``base_test_predictions`` / ``test_predictions`` [N] int,
    ``labels`` [N] int, ``confusion_delta`` [K, K] int (after − before; rows true class, columns
    predicted), ``fixed`` (indices wrong before, right after) and ``broken`` (right before, wrong after).
    """
    from .metrics import prediction_churn

    if [r["id"] for r in before["images"]] != [r["id"] for r in after["images"]]:
        raise CfdebugError("Expected two detection results on the same images, but their image ids differ.")
    labels = np.asarray([r["true"] for r in before["images"]], dtype=np.int64)  # [N]
    base = np.asarray([r["predicted"] for r in before["images"]], dtype=np.int64)  # [N]
    treated = np.asarray([r["predicted"] for r in after["images"]], dtype=np.int64)  # [N]
    churn = prediction_churn(base, treated, labels, num_classes)
    return {
        "base_test_predictions": base.tolist(),
        "test_predictions": treated.tolist(),
        "labels": labels.tolist(),
        **{name: churn[name].tolist() for name in ("confusion_delta", "fixed", "broken")},
    }


# --------------------------------------------------------------------------------------------
# xcr
# --------------------------------------------------------------------------------------------


def _parse_xcr_spec(spec: dict):
    if not isinstance(spec, dict) or "workspace" not in spec or "xcr" not in spec:
        held = ", ".join(spec) if isinstance(spec, dict) else type(spec).__name__
        raise CfdebugError(f"Expected the run config to hold `workspace` and `xcr`, but it holds {held or 'nothing'}; start a new XCR run instead.")
    return workspace_config_from_dict(spec["workspace"]), xcr_config_from_dict(spec["xcr"])


def run_xcr_job(
    spec: dict,
    *,
    registry=None,
    run_id: str | None = None,
    progress: Progress | None = None,
    on_start: Callable[[str, object], None] | None = None,
    use_cache: bool = True,
) -> dict | None:
    """Run an XCR report (:func:`~cfdebug.xcr.run_xcr_report`) for an xcr spec (:func:`xcr_spec`) as a registry run.

    The options are checked against the data first (:func:`~cfdebug.xcr.check_report_inputs`:
    ``k`` and the patch size against the image size, the CIFAR-10-C folder, …), before a run
    exists: a mistake raises :class:`CfdebugError` and registers nothing (a run given by
    ``run_id`` fails with the message). Then, as :func:`run_treat_job` does, ``run_id=None``
    registers a new run; the report runs inside :func:`~cfdebug.runs.run_context` (status, cancel
    by ``SIGTERM``), logs its progress rows, resumes its retraining checkpoints from the run's
    folder and stores the result.

    Args:
        spec: an xcr spec. registry: default the one of the spec's workdir.
        run_id: a registered run (:func:`~cfdebug.runs.start_background_run`), or ``None``.
        progress: ``progress(fraction, message)``, the same progress as text.
        on_start: called as ``on_start(run_id, workspace)`` once the run is registered and its
            workspace loaded (the CLI prints where the run lives).
        use_cache: return a stored report of the same workspace and config when there is one.

    Returns:
        The report dict; ``None`` when the run was cancelled (the registry records it).
    """
    from .data import load_data
    from .runs import RunRegistry, run_context
    from .workspace import Workspace
    from .xcr import check_report_inputs, run_xcr_report

    try:
        ws_config, config = _parse_xcr_spec(spec)
        registry = registry if registry is not None else RunRegistry(ws_config.workdir)
        check_report_inputs(load_data(ws_config.data), config)
    except CfdebugError as exc:
        if registry is not None and run_id is not None:
            registry.set_status(run_id, "failed", error=str(exc))
        raise
    if run_id is None:
        run_id = registry.create("xcr", spec).run_id
    result = None  # stays None when run_context ends the run as cancelled
    with run_context(registry, run_id):
        ws = Workspace(ws_config, progress)
        if on_start is not None:
            on_start(run_id, ws)
        result = run_xcr_report(ws, config, progress, registry, run_id, use_cache=use_cache)
        registry.set_result(run_id, result)
    return result


# --------------------------------------------------------------------------------------------
# revise
# --------------------------------------------------------------------------------------------


def revise_spec(workspace: WorkspaceConfig, config, declaration: dict, seeds: Sequence[int], budget: float = 0.1) -> dict:
    """The spec of a revise run: ``declaration`` (``{"method", "region", "filters"}``, what is not
    evidence) fine-tuned with ``config`` (:class:`~cfdebug.config.ReviseConfig`) against the CE
    control, for every seed; ``budget`` the review budget whose flags are counted."""
    seeds = [int(v) for v in seeds]
    if not seeds:
        raise CfdebugError("Expected at least one seed, but got none.")
    known = {"method", "region", "filters"}
    if not isinstance(declaration, dict) or "method" not in declaration or set(declaration) - known:
        raise CfdebugError(f"Expected the declaration as {{'method', 'region', 'filters'}}, but got {declaration!r}.")
    return {"workspace": config_dict(workspace), "revise": config_dict(config), "declaration": dict(declaration),
            "seeds": seeds, "budget": float(budget)}


def _parse_revise_spec(spec: dict):
    from .config import ReviseConfig

    try:
        return (workspace_config_from_dict(spec["workspace"]), ReviseConfig(**spec["revise"]), dict(spec["declaration"]),
                [int(s) for s in spec["seeds"]], float(spec.get("budget", 0.1)))
    except (KeyError, TypeError, ValueError) as exc:
        raise CfdebugError(f"The run config is not a revise config ({exc}). Start a new run instead.") from None


#: The stages of a revise run, each its share of the run's bar.
REVISE_SPANS = {"load": (0.0, 0.05), "detect": (0.05, 0.1), "sweep": (0.1, 1.0)}


def run_revise_job(spec: dict, *, registry=None, run_id: str | None = None, progress: Progress | None = None,
                   on_start: Callable[[str, object], None] | None = None) -> dict | None:
    """Run a revise spec (:func:`revise_spec`) as a registry run: the CE control and the method
    for every seed (:func:`~cfdebug.revise.revise_sweep`, checkpoints in the run folder, so a
    relaunch resumes), then the verdicts (:func:`~cfdebug.claims.revise_verdicts`).

    The declaration is checked against the data before a run is registered (a mistake registers
    nothing). Returns the sweep's result plus ``run_id``, ``classes``, ``labels`` (test),
    ``flagged`` (the base model's review-budget flags, test indices), ``verdicts`` and
    ``summary``; stored in the registry. ``None`` when the run was cancelled (the registry
    records it).
    """
    from .claims import budget_flags, detection_scores, revise_summary, revise_verdicts
    from .detect import run_detection
    from .revise import declare, revise_sweep
    from .runs import RunRegistry, RunStages, run_context
    from .runtime import scaled_progress
    from .workspace import Workspace

    ws_config, config, declaration, seeds, budget = _parse_revise_spec(spec)
    registry = registry if registry is not None else RunRegistry(ws_config.workdir)
    if run_id is None:
        declare(Workspace(ws_config), declaration["method"], declaration.get("region"), declaration.get("filters"))  # before a run exists
        run_id = registry.create("revise", spec).run_id
    stages = RunStages(REVISE_SPANS, lambda row: registry.log_progress(run_id, row), progress)
    result = None  # stays None when run_context ends the run as cancelled
    with run_context(registry, run_id):
        ws = Workspace(ws_config, scaled_progress(stages.stage("load", "Loading the model and data"), 0.0, 1.0, "training: "))
        decl = declare(ws, declaration["method"], declaration.get("region"), declaration.get("filters"))
        if on_start is not None:
            on_start(run_id, ws)
        report = run_detection(ws, progress=stages.stage("detect", "Detection on the base model"))
        flagged = budget_flags(detection_scores(report)[0]["mc_agreement"], budget)
        result = revise_sweep(ws, decl, seeds, config, run_dir=registry.run_dir(run_id), registry=registry, run_id=run_id,
                              progress=stages.stage("sweep", f"Revise ({decl.method}) vs its CE control"))
        labels = ws.data.splits["test"].labels
        verdicts = [c.as_dict() for c in revise_verdicts(result, labels, ws.data.classes, flagged)]
        result = {"run_id": run_id, "classes": list(ws.data.classes), "labels": [int(v) for v in labels],
                  "flagged": np.flatnonzero(flagged).tolist(), "budget": budget, "verdicts": verdicts,
                  "summary": revise_summary(result, ws.data.input_size), **result}
        registry.set_result(run_id, result)
    return result


# --------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------

#: What a prepare run makes, in order; a spec's ``through`` names the last one it runs.
#: ``load``: the workspace (its model trained and cached when it has to be); ``extract``: pooled
#: features and logits of train, val and test; ``filters``: MC heads and global MC filters;
#: ``detect``: the detection report (all with the default configs the dashboard uses).
PREPARE_STAGES = ("load", "extract", "filters", "detect")
_STAGE_LABELS = {"load": "Loading the model and data", "extract": "Extracting features", "filters": "Fitting CFE heads", "detect": "Scoring the test predictions"}
#: The stages of a treat run and their shares of its bar: the workspace, the global MC sets the
#: losses use (CFE heads), the sweep (every λ pair and the control, per seed) and detection on the
#: best treated model.
TREAT_SPANS = {"load": (0.0, 0.05), "sets": (0.05, 0.15), "sweep": (0.15, 0.9), "detect": (0.9, 1.0)}


def prepare_key(workspace: WorkspaceConfig, train: bool = False) -> str:
    """The key two prepare runs share when they make the same artifacts: the workspace and ``train``.

    :func:`~cfdebug.runs.start_background_run` joins a queued or running prepare run with this key
    instead of starting another, whatever its ``through``."""
    return stable_hash("prepare", config_dict(workspace), bool(train))


def prepare_spec(workspace: WorkspaceConfig, through: str = "extract", *, train: bool = False, detect_seeds=(0,)) -> dict:
    """The spec of a prepare run: open ``workspace`` and make its artifacts up to ``through``
    (one of :data:`PREPARE_STAGES`). ``train=True`` trains the model on the workspace data (a
    torchvision builder with random weights, the dashboard's *Train* action) and stops there.
    ``detect_seeds``: the CFE seeds the ``detect`` stage scores (the dashboard asks for the
    seeds ``report`` judges detection over, :data:`cfdebug.claims.DEFAULT_SEEDS`)."""
    check_choice(through, "through", PREPARE_STAGES)
    if train and through != "load":
        raise CfdebugError(f"Expected `through` to be 'load' for a training run, but got {through!r}; open the trained weights in a second run.")
    spec = {"workspace": config_dict(workspace), "train": bool(train), "through": through, "key": prepare_key(workspace, train)}
    if tuple(detect_seeds) != (0,):
        spec["detect_seeds"] = [int(s) for s in detect_seeds]
    return spec


def _detect_configs(seeds) -> list:
    """The :class:`DetectConfig` of each CFE seed (seed 0 is the default config)."""
    from .config import CFEConfig, DetectConfig, MCFilterConfig

    return [DetectConfig(filters=MCFilterConfig(cfe=CFEConfig(seed=int(seed)))) for seed in seeds]


def prepared(ws, through: str, detect_seeds=(0,)) -> bool:
    """Whether every artifact a prepare run up to ``through`` makes is cached for the open workspace ``ws``."""
    from .detect import CACHE_KIND as DETECT_KIND, report_key
    from .mcfilters import CACHE_KIND as FILTERS_KIND, filters_key

    stage = PREPARE_STAGES.index(check_choice(through, "through", PREPARE_STAGES))
    if stage >= 1 and not all(ws.store.exists(ws.extractions.KIND, ws.extractions.key(s)) for s in ("train", "val", "test")):
        return False
    if stage >= 2 and not ws.store.exists(FILTERS_KIND, filters_key(ws)):
        return False
    return stage < 3 or all(ws.store.exists(DETECT_KIND, report_key(ws, config)) for config in _detect_configs(detect_seeds))


def _parse_prepare_spec(spec: dict) -> tuple[WorkspaceConfig, bool, str, tuple]:
    if not isinstance(spec, dict) or "workspace" not in spec:
        held = ", ".join(spec) if isinstance(spec, dict) else type(spec).__name__
        raise CfdebugError(f"Expected the run config to hold `workspace` (a prepare run's spec), but it holds {held or 'nothing'}; start a new run instead.")
    through = check_choice(spec.get("through", "extract"), "through", PREPARE_STAGES)
    return workspace_config_from_dict(spec["workspace"]), bool(spec.get("train", False)), through, tuple(spec.get("detect_seeds", (0,)))


def _prepare(ws_config: WorkspaceConfig, train: bool, through: str, log: Callable[[dict], None] | None, progress: Progress | None,
             detect_seeds=(0,), should_stop: Callable[[], bool] | None = None) -> dict:
    """The stages of a prepare run, sharing the bar equally (:meth:`RunStages.equal`, rows to
    ``log``, text to ``progress``); returns the result. ``should_stop`` is polled between the
    batches of the CFE heads' fit (the long stage of a VGG-style model), which then stops with
    :class:`~cfdebug.runs.RunCancelled`."""
    from .cfe import mc_heads
    from .detect import run_detection
    from .mcfilters import global_mc_filters
    from .runs import RunStages
    from .runtime import scaled_progress
    from .workspace import Workspace

    start = time.perf_counter()
    stages = PREPARE_STAGES[: PREPARE_STAGES.index(through) + 1]
    report = RunStages.equal(stages, log, progress)
    label = f"Training {ws_config.model.name}" if train else _STAGE_LABELS["load"]
    ws = Workspace(ws_config, scaled_progress(report.stage("load", label), 0.0, 1.0, "" if train else "training "), train=train)
    if "extract" in stages:
        stage = report.stage("extract", _STAGE_LABELS["extract"])
        for i, split in enumerate(("train", "val", "test")):
            ws.extractions.get(split, scaled_progress(stage, i / 3, (i + 1) / 3, f"{split} split, "))
        if stage:
            stage(1.0, "done")
    if "filters" in stages:
        # The heads' fit first, on nearly the whole bar: the filters after it take a moment, and
        # the time left is measured as if the bar moved at one speed.
        stage = report.stage("filters", _STAGE_LABELS["filters"])
        mc_heads(ws, None, scaled_progress(stage, 0.0, 0.95), should_stop=should_stop)
        global_mc_filters(ws, None, scaled_progress(stage, 0.95, 1.0))
    if "detect" in stages:
        stage, configs = report.stage("detect", _STAGE_LABELS["detect"]), _detect_configs(detect_seeds)
        for i, (seed, config) in enumerate(zip(detect_seeds, configs)):
            label = f"CFE seed {seed}: " if len(configs) > 1 else ""
            run_detection(ws, config, scaled_progress(stage, i / len(configs), (i + 1) / len(configs), label), should_stop=should_stop)
    meta = ws.model_meta
    result = {
        "model": ws.config.model.name, "data": ws.data.name, "through": through, "model_digest": ws.model_digest,
        "random_weights": ws.random_weights, "accuracy": meta.get("accuracy"), "seconds": time.perf_counter() - start,
    }
    if train:
        result["weights"] = str(ws.trained_weights_path())
    return result


def run_prepare_job(spec: dict, *, registry=None, run_id: str | None = None, progress: Progress | None = None) -> dict | None:
    """Run a prepare spec (:func:`prepare_spec`); return ``{"model", "data", "through",
    "model_digest", "random_weights", "accuracy", "seconds"}`` (and ``"weights"``, the trained
    state_dict's path, for a training run); ``None`` when the run was cancelled.

    With ``run_id`` (registered by :func:`~cfdebug.runs.start_background_run`) it runs inside
    :func:`~cfdebug.runs.run_context` (status, cancel by ``SIGTERM`` or by the run's cancel flag,
    polled between the batches of the CFE heads' fit; a user mistake fails the run
    with its own message), logs a progress row per stage step (:class:`~cfdebug.runs.RunStages`:
    step, steps, the stage's message) and stores the result. ``registry`` defaults to the one of
    the spec's workdir. ``progress(fraction, message)`` gets the same progress as text. Without
    ``run_id`` nothing is registered (the dashboard's prepare runs are registered by its launcher).
    """
    from .runs import RunRegistry, run_context

    ws_config, train, through, seeds = _parse_prepare_spec(spec)
    if run_id is None:
        return _prepare(ws_config, train, through, None, progress, seeds)
    registry = registry if registry is not None else RunRegistry(ws_config.workdir)
    result = None  # stays None when run_context ends the run as cancelled
    with run_context(registry, run_id):
        result = _prepare(ws_config, train, through, lambda row: registry.log_progress(run_id, row), progress, seeds,
                          should_stop=lambda: registry.cancel_requested(run_id))
        registry.set_result(run_id, result)
    return result
