"""The XCR report: paper B's Table 1 (explanations) and Table 2 (calibration and robustness).

:func:`run_xcr_report` runs the stages in order: Table 1
(:func:`~cfdebug.xcr.explanations.explanation_table`), the training masks of the report's
selector, for each seed a vanilla and an XCR retraining (identical schedule and seeds; a
random-mask one with ``random_baseline``) with a temperature fitted on the validation split
(``+TS``), then accuracy, ECE (15 bins), NLL and Brier (``[0, 2]``) of every model on the clean
test split and its corrupted copies (:mod:`cfdebug.xcr.robustness`).

The whole report is cached in the workspace store (``xcr-report/<key>``, key = workspace
inputs + ``XCRConfig``), so a second call with the same inputs returns at once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import config_dict
from ..data.corruptions import MIN_IMAGE_SIZE
from ..errors import CfdebugError
from ..runtime import Progress, scaled_progress
from ..store import jsonable
from .estimate import estimate_xcr, stage_spans, table1_modes
from .keys import REPORT_FORMAT, REPORT_KIND, report_key
from .explanations import explanation_table
from .patches import check_patch_grid
from .retrain import XCRConfig, counterfactual_retrain, fit_val_temperature, training_masks, vanilla_retrain, xcr_config_from_dict
from .robustness import check_cifar10c, evaluate_models, per_image_arrays, table2_results
from .selector import approximator_accuracy, selector_masks, trained_selector

__all__ = ["REPORT_KIND", "PER_IMAGE_FILE", "report_key", "describe_settings", "check_report_inputs", "run_xcr_report", "per_image_scores"]

#: Beside ``result.json``: every variant's per-image terms (:func:`per_image_scores`).
PER_IMAGE_FILE = "per_image.npz"



def describe_settings(config: XCRConfig) -> str:
    """One line with the settings that shape the numbers (printed under the tables)."""
    sel, rt = config.selector, config.retrain
    corr = f"{len(config.corruptions)} corruptions × severities {','.join(map(str, config.severities))}" if config.corruptions else "no corruptions"
    source = f" from CIFAR-10-C files in {config.cifar10c_dir}" if config.cifar10c_dir else ""
    return (
        f"selector k={sel.k}, β={sel.beta:g}, p={sel.patch_size}, {sel.mode}, {sel.epochs} epochs at lr {sel.lr:g}; "
        f"retraining {rt.epochs} epochs, {rt.optimizer} lr {rt.lr:g}, trainable {rt.trainable}, init {config.init}, "
        f"seeds {','.join(map(str, config.seeds))}; {corr}{source}; {_describe_table1(config)}"
    )


def _describe_table1(config: XCRConfig) -> str:
    ks, betas = config.table1_grid()
    if not ks:
        return "no Table 1"
    if not config.table1_sweep:
        return "Table 1 at that k, β" + ("" if "VIBI" in table1_modes(config) else " (XCR and random masks)")
    return f"Table 1 over k ∈ {{{', '.join(map(str, ks))}}} × β ∈ {{{', '.join(f'{b:g}' for b in betas)}}}"


def check_report_inputs(data, config: XCRConfig) -> int:
    """Everything checkable before training, on the workspace's data (a
    :class:`~cfdebug.data.DataBundle`): k and the patch size against the image size, the splits,
    the image size the corruptions need, the CIFAR-10-C files. Returns ``d`` (patches per image).
    :func:`cfdebug.jobs.run_xcr_job` calls it before a run is registered."""
    d = check_patch_grid(config, data.input_size)
    for split in ("train", "val", "test"):
        if len(data.splits[split]) == 0:
            raise CfdebugError(f"Expected a non-empty `{split}` split for the XCR report, but it has no images.")
    if config.corruptions and config.cifar10c_dir is None and data.input_size < MIN_IMAGE_SIZE:
        raise CfdebugError(
            f"Expected images of at least {MIN_IMAGE_SIZE}×{MIN_IMAGE_SIZE} pixels for the corruptions, but the model's "
            f"input size is {data.input_size}. Use a larger input size, or evaluate without corruptions (corruptions=[])."
        )
    if config.cifar10c_dir is not None and config.corruptions:
        check_cifar10c(Path(config.cifar10c_dir), config.corruptions, len(data.splits["test"]))
    return d


class _Stages:
    """Progress over the report's stages (one bar, ``spans``: each stage's share in proportion to
    its estimated time, :func:`~cfdebug.xcr.estimate.stage_spans`), and the cancel checks between steps.

    ``report(fraction, message)`` is the current stage's callback of a
    :class:`~cfdebug.runs.RunStages`: the whole report's fraction goes to ``progress`` and, with
    a registry, a progress row to the run's stream; ``stop()`` is the ``should_stop`` polled by
    long steps; ``check()`` raises ``RunCancelled`` when stopped.
    """

    def __init__(self, progress, registry, run_id, should_stop, spans, estimate: str):
        from ..runs import RunStages

        log = None if registry is None else (lambda row: registry.log_progress(run_id, row))
        self.stages = RunStages(spans, log, progress)
        self.registry, self.run_id, self.should_stop = registry, run_id, should_stop
        self._report = self.stages.stage("table1", f"whole run estimated at {estimate} here")

    def stop(self) -> bool:
        if self.should_stop is not None and self.should_stop():
            return True
        return self.registry is not None and self.registry.cancel_requested(self.run_id)

    def check(self) -> None:
        from ..runs import RunCancelled

        if self.stop():
            raise RunCancelled(f"XCR report {'run ' + repr(self.run_id) + ' ' if self.run_id else ''}was cancelled")

    def report(self, fraction: float, message: str) -> None:
        if self._report is not None:
            self._report(fraction, message)

    def enter(self, name: str) -> None:
        """Start stage ``name`` (after a cancel check)."""
        self.check()
        self._report = self.stages.stage(name)


def _selector_info(ws, config: XCRConfig, d: int) -> dict:
    """The report's selector: config, ``d``, best validation and test accuracy of its approximator."""
    sel, approx, sel_meta = trained_selector(ws, config.selector)
    test_split = ws.data.torch_split("test")
    selector_masks(ws, config.selector, "test")  # cached for the dashboard's mask gallery
    return {
        "config": config_dict(config.selector),
        "d": d,
        "best_val_acc": sel_meta["history"]["best_val_acc"],
        "test_acc": approximator_accuracy(sel, approx, test_split, config.k, config.patch_size, torch.device(ws.device), config.selector.mode),
    }


def _retrain_all(ws, config: XCRConfig, methods: list[str], masks: dict, stages: _Stages, run_dir, registry, run_id):
    """Every method × seed retrained with one schedule: ``(models, temperatures, retrain_info)``,
    each ``{method: [per seed]}``; ``run_dir`` holds one checkpoint folder per run (resume)."""
    models: dict[str, list] = {m: [] for m in methods}
    temperatures: dict[str, list[float]] = {m: [] for m in methods}
    retrain_info: dict[str, list[dict]] = {m: [] for m in methods}
    runs_total, done = len(config.seeds) * len(methods), 0
    for seed in config.seeds:
        for method in methods:
            stages.check()
            prefix = f"retrain {done + 1}/{runs_total} ({method}, seed {seed}): "
            sub = scaled_progress(stages.report, done / runs_total, (done + 1) / runs_total, prefix)
            folder = None if run_dir is None else Path(run_dir) / f"{method}-seed{seed}"
            if method == "vanilla":
                result = vanilla_retrain(ws, config, seed, sub, run_dir=folder, registry=registry, run_id=run_id)
            else:
                result = counterfactual_retrain(ws, config, seed, masks[method], sub, run_dir=folder, registry=registry,
                                                run_id=run_id, method=method)
            models[method].append(result.model)
            temperatures[method].append(fit_val_temperature(result.model, ws.data, torch.device(ws.device)))
            retrain_info[method].append({"seed": int(seed), "best_epoch": result.best_epoch, "accuracy": result.accuracy,
                                         "history": result.history, "resumed_from": result.resumed_from})
            done += 1
    return models, temperatures, retrain_info


def _cached_report(ws, key: str, progress: Progress | None, registry, run_id) -> dict:
    with open(ws.store.path(REPORT_KIND, key) / "result.json") as handle:
        result = json.load(handle)
    result["cache_hit"] = True
    if progress is not None:
        progress(1.0, "XCR report read from the cache")
    if registry is not None:
        from ..runs import progress_row

        registry.log_progress(run_id, progress_row(1.0, "cached", "XCR report read from the cache"))
    return result


def run_xcr_report(
    ws,
    config: XCRConfig | None = None,
    progress: Progress | None = None,
    registry=None,
    run_id: str | None = None,
    should_stop: Callable[[], bool] | None = None,
    *,
    run_dir: str | Path | None = None,
    use_cache: bool = True,
) -> dict:
    """Paper B's Tables 1 and 2 for ``ws``: selector, retraining, calibration under corruption.

    Args:
        ws: the workspace.
        config: :class:`XCRConfig` (or its dict; default :func:`~cfdebug.xcr.retrain.default_xcr_config`).
        progress: ``progress(fraction in [0, 1], message)``.
        registry, run_id: a :class:`~cfdebug.runs.RunRegistry` and run id: progress rows
            (:mod:`cfdebug.runs.progress`; the retraining's epoch rows too) are logged
            there, its cancel flag is polled (raising :class:`~cfdebug.runs.RunCancelled`), and
            the retraining checkpoints go to ``run_dir`` (default: the run's folder) so a
            relaunched run resumes. The caller stores the result (``registry.set_result``).
        should_stop: polled between steps; True raises :class:`~cfdebug.runs.RunCancelled`.
        run_dir: checkpoint folder for the retraining runs (resume); default none without a registry.
        use_cache: return a stored report for the same workspace and config when there is one.

    Returns:
        A JSON-ready dict: ``table1`` (rows, ``TABLE1_COLUMNS`` + ``accuracy_of``,
        ``masked_acc``, ``n_images``); ``table2`` (rows, ``TABLE2_COLUMNS`` + ``n_seeds``,
        ``temperature`` (mean fitted T; 1 without TS)); ``per_corruption`` (rows ``{"method",
        "corruption", "severity", "accuracy", "ece", "nll", "brier"}``, means over seeds);
        ``per_seed`` (Table 2 per seed); ``reliability`` (``{"clean"|"corrupt": {method: bins}}``,
        bins pooled over seeds, and over corruptions for ``corrupt``); ``temperatures``
        (``{method: [T per seed]}``); ``retrain`` (per method and seed: best epoch, accuracy,
        history); ``selector`` (config, validation/test accuracy of the approximator, ``d``);
        ``config``; ``workspace``; ``settings`` (a one-line description); ``seconds``; ``cache_hit``.
    """
    from .retrain import default_xcr_config

    config = xcr_config_from_dict(config) if isinstance(config, dict) else (config or default_xcr_config(ws.config))
    if (registry is None) != (run_id is None):
        raise CfdebugError("Expected both `registry` and `run_id`, or neither.")
    d = check_report_inputs(ws.data, config)
    key = report_key(ws, config)
    if use_cache and ws.store.exists(REPORT_KIND, key):
        return _cached_report(ws, key, progress, registry, run_id)

    started = time.perf_counter()
    estimate = estimate_xcr(ws, config)  # a few timed steps: the bar's stages move at the work's speed
    stages = _Stages(progress, registry, run_id, should_stop, stage_spans(estimate.stages), estimate.describe())
    if run_dir is None and registry is not None:
        run_dir = registry.run_dir(run_id)
    ks, betas = config.table1_grid()
    table1 = explanation_table(
        ws, ks, betas, table1_modes(config), selector=config.selector,
        seed=config.selector.seed, progress=stages.report, should_stop=stages.stop,
    ) if ks else []

    stages.enter("retrain")
    methods = ["vanilla", "xcr"] + (["random"] if config.random_baseline else [])
    stages.report(0.0, f"selector k={config.k} β={config.selector.beta:g} for retraining")
    masks = {"xcr": training_masks(ws, config, "xcr", None, stages.stop)}
    if config.random_baseline:
        masks["random"] = training_masks(ws, config, "random")
    selector_info = _selector_info(ws, config, d)
    models, temperatures, retrain_info = _retrain_all(ws, config, methods, masks, stages, run_dir, registry, run_id)

    stages.enter("evaluate")
    scores = evaluate_models(ws, config, models, temperatures, stages.report, stages.check)
    variants = [m + ts for m in methods for ts in ("", "+TS")]
    arrays, sets = per_image_arrays(scores, variants, len(config.seeds))
    result = {
        "table1": table1,
        **table2_results(config, methods, scores, temperatures),
        "temperatures": temperatures,
        "retrain": retrain_info,
        "selector": selector_info,
        "config": config_dict(config),
        "workspace": {"model": ws.config.model.name, "data": ws.data.name, "n_test": scores["n_test"],
                      "n_corrupt": scores["n_corrupt"], "input_size": ws.data.input_size},
        "settings": describe_settings(config),
        "estimate": estimate.as_dict(),
        "per_image": {"file": PER_IMAGE_FILE, "variants": variants, "seeds": list(config.seeds), "sets": sets},
        "seconds": time.perf_counter() - started,
        "cache_hit": False,
    }
    result = jsonable(result)
    with ws.store.writer(REPORT_KIND, key, {"config": config_dict(config), "key_parts": ws.key_parts, "format": REPORT_FORMAT}) as tmp:
        with open(tmp / "result.json", "w") as handle:
            json.dump(result, handle)
        np.savez_compressed(tmp / PER_IMAGE_FILE, **arrays)
    stages.report(1.0, f"XCR report done in {result['seconds']:.0f} s")
    return result


def per_image_scores(ws, config: XCRConfig, result: dict) -> dict[str, np.ndarray]:
    """The per-image terms of a report made by :func:`run_xcr_report` (cached in the store beside
    ``result.json``): ``clean_<field>`` ``[V, S, N]`` and ``corrupt_<field>`` ``[V, S, G, Nc]``
    (fields :data:`~cfdebug.xcr.robustness.IMAGE_FIELDS`, variants and sets as in
    ``result["per_image"]``)."""
    path = ws.store.path(REPORT_KIND, report_key(ws, config)) / PER_IMAGE_FILE
    if "per_image" not in result or not path.is_file():
        raise CfdebugError(f"Expected the XCR report's per-image scores in {path}, but they are missing; run the report again with use_cache=False.")
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
