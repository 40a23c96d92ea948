"""How long an XCR report will take, measured on this machine before it starts.

:func:`measure_unit_costs` is the calibration step: a few real training steps of the selector
and of the black box (vanilla and XCR batches), forward passes, image loading and every
corruption of the config on a handful of test images, each timed on the workspace's own data,
model and device (a few seconds). :func:`estimate_xcr` multiplies those unit costs by the work a
config asks for (epochs × batches, passes over each split, corrupted sets), leaving out what the
store already holds (a trained selector, the whole report), and returns the seconds per stage
with a range: the load of a shared machine changes while a run goes on, so the range is
:data:`RANGE` around the point estimate.

:func:`stage_spans` turns an estimate into the report's progress spans, so the bar (and the time
left the dashboard measures on it) moves at the speed the work does.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..config import XCRConfig

__all__ = ["RANGE", "UnitCosts", "XCREstimate", "measure_unit_costs", "estimate_xcr", "stage_spans", "describe_duration", "table1_modes"]

#: The estimate's range as factors of its point value: the measured steps are a few seconds of a
#: shared machine, whose load changes (checked against real runs: see the README, Calibration).
RANGE = (0.8, 1.6)
#: Test images each corruption is timed on.
_PROBE_IMAGES = 16
#: The report's stages, in run order (:mod:`cfdebug.xcr.report`).
STAGES = ("table1", "retrain", "evaluate")


@dataclass(frozen=True)
class UnitCosts:
    """Seconds per unit of work, measured by :func:`measure_unit_costs` (all ≥ 0).

    ``selector_step``: one selector + approximator training step on a batch of
    ``selector_batch`` images; ``selector_forward``: selector + approximator inference per image;
    ``vanilla_step`` / ``xcr_step``: one retraining step of the black box on a batch of
    ``retrain_batch`` images (XCR: twice as many, the originals and their ``T(x)``);
    ``forward``: black-box inference per image; ``scoring``: scoring one uint8 test image as the
    evaluation does (normalised, then forward); ``load``: reading and transforming one training
    image; ``corruption``: per corruption name, generating it on one test image.
    """

    selector_step: float
    selector_forward: float
    selector_batch: int
    vanilla_step: float
    xcr_step: float
    forward: float
    scoring: float
    load: float
    retrain_batch: int
    corruption: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class XCREstimate:
    """Seconds a report will take: ``stages`` (``table1``, ``retrain``, ``evaluate``), ``parts``
    (what makes them up, for a person: ``"selectors (2 to train)"`` → seconds), the point
    estimate ``seconds`` and its range ``low``–``high``. ``cached``: the whole report is stored
    and reads back at once."""

    stages: dict[str, float]
    parts: dict[str, float]
    seconds: float
    low: float
    high: float
    cached: bool = False

    def describe(self) -> str:
        """``"3–5 min"`` (or ``"read from the cache"``)."""
        if self.cached:
            return "read from the cache (seconds)"
        return describe_duration(self.low, self.high)

    def as_dict(self) -> dict:
        return {"stages": self.stages, "parts": self.parts, "seconds": self.seconds, "low": self.low, "high": self.high,
                "cached": self.cached}


def describe_duration(low: float, high: float) -> str:
    """A range of seconds for a person: ``"40–80 s"``, ``"3–5 min"``, ``"1.2–2.4 h"``."""
    if high < 90:
        return f"{max(int(low), 1)}–{max(int(math.ceil(high)), 2)} s"
    if high < 90 * 60:
        lo, hi = max(int(low // 60), 1), int(math.ceil(high / 60))
        return f"{lo}–{max(hi, lo + 1)} min"
    return f"{low / 3600:.1f}–{high / 3600:.1f} h"


#: Each kind of step is timed for at least this long (seconds): on a shared machine one short call
#: says little about the throughput a run of minutes will see.
_MIN_TIMING_S = 0.6


def _timed(fn: Callable[[], object], repeats: int) -> float:
    """Mean seconds of ``fn()`` over at least ``repeats`` calls and :data:`_MIN_TIMING_S`, after one warm-up call."""
    fn()
    count, start = 0, time.perf_counter()
    while count < repeats or time.perf_counter() - start < _MIN_TIMING_S:
        fn()
        count += 1
    return (time.perf_counter() - start) / count


def _batch(split, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    items = [split[i] for i in range(min(n, len(split)))]
    return torch.stack([x for x, *_ in items]), torch.as_tensor([int(y) for _, y, *_ in items])


def _selector_costs(ws, config: XCRConfig, device, repeats: int) -> tuple[float, float]:
    """(seconds per selector training step, per image of selector + approximator inference)."""
    from .selector import Approximator, PatchSelector, apply_mask, selector_loss, topk_mask, training_mask

    cfg = config.selector
    x, y = _batch(ws.data.torch_split("train"), cfg.batch_size)
    x, y = x.to(device), y.to(device)
    selector = PatchSelector(cfg.patch_size, 3, cfg.width).to(device)
    approximator = Approximator(ws.data.num_classes, 3, cfg.width).to(device)
    optimizer = torch.optim.Adam(list(selector.parameters()) + list(approximator.parameters()), lr=cfg.lr)

    def step():
        log_p = selector(x)
        logits = approximator(apply_mask(x, training_mask(log_p, cfg), cfg.patch_size))
        optimizer.zero_grad()
        selector_loss(logits, y, log_p, cfg.beta)["loss"].backward()
        optimizer.step()

    def infer():  # scoring and masks: the hard top-k map, no Gumbel draws
        with torch.no_grad():
            log_p = selector(x)
            approximator(apply_mask(x, topk_mask(log_p, cfg.k), cfg.patch_size))

    return _timed(step, repeats), _timed(infer, repeats) / len(x)


def _blackbox_costs(ws, config: XCRConfig, device, repeats: int) -> tuple[float, float, float]:
    """(seconds per vanilla retraining step, per XCR step, per image of inference) on a copy of the model."""
    bs = config.retrain.batch_size
    x, y = _batch(ws.data.torch_split("train"), bs)
    x, y = x.to(device), y.to(device)
    model = copy.deepcopy(ws.model).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-12)  # a step that changes (almost) nothing: only its time counts

    def step(inputs, labels):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()

    vanilla = _timed(lambda: step(x, y), repeats)
    xcr = _timed(lambda: step(torch.cat([x, x]), torch.cat([y, y])), repeats)
    model.eval()

    def infer():
        with torch.no_grad():
            model(x)

    return vanilla, xcr, _timed(infer, repeats) / len(x)


def _scoring_cost(ws, repeats: int) -> float:
    """Seconds per image to score uint8 test images as the evaluation does
    (:func:`~cfdebug.xcr.images.predict_images`: normalise, forward, in chunks of 256)."""
    from .images import predict_images, test_images

    images, _, _ = test_images(ws, min(256, len(ws.data.splits["test"])), seed=0)
    return _timed(lambda: predict_images(ws.model, images, ws.data, ws.device), repeats) / len(images)


def _corruption_costs(ws, config: XCRConfig) -> dict[str, float]:
    """Seconds per image to generate each corruption of ``config`` (at its middle severity)."""
    from ..data.corruptions import corrupt
    from .images import test_images

    if not config.corruptions or config.cifar10c_dir is not None:
        return {}
    images, _, _ = test_images(ws, min(_PROBE_IMAGES, len(ws.data.splits["test"])), seed=0)
    severity = sorted(config.severities)[len(config.severities) // 2]
    out = {}
    for name in config.corruptions:
        start = time.perf_counter()
        corrupt(images, name, severity, 0)
        out[name] = (time.perf_counter() - start) / len(images)
    return out


def measure_unit_costs(ws, config: XCRConfig, repeats: int = 3) -> UnitCosts:
    """The calibration step: time a few real steps of each kind of work on ``ws`` (a few seconds).

    Nothing is stored and the workspace's model is not changed (a copy trains). The RNG state is
    put back afterwards, so measuring changes no later result.
    """
    start = time.perf_counter()
    device = torch.device(ws.device)
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    try:
        load = _timed(lambda: _batch(ws.data.torch_split("train"), 16), 1) / 16
        sel_step, sel_forward = _selector_costs(ws, config, device, repeats)
        vanilla, xcr, forward = _blackbox_costs(ws, config, device, repeats)
        scoring = _scoring_cost(ws, 1)
        corruption = _corruption_costs(ws, config)
    finally:
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return UnitCosts(selector_step=sel_step, selector_forward=sel_forward, selector_batch=config.selector.batch_size,
                     vanilla_step=vanilla, xcr_step=xcr, forward=forward, scoring=scoring, load=load, retrain_batch=config.retrain.batch_size,
                     corruption=corruption, seconds=time.perf_counter() - start)


def _sizes(ws) -> dict[str, int]:
    return {s: len(ws.data.splits[s]) for s in ("train", "val", "test")}


def _selector_training(units: UnitCosts, config, n: dict[str, int], vibi: bool = False) -> float:
    """One selector's training: every epoch's batches (VIBI also asks the black box) and its
    validation and test scoring."""
    cfg = config.selector
    steps = math.ceil(n["train"] / cfg.batch_size)
    per_epoch = steps * units.selector_step + n["train"] * units.load + (n["val"] + n["test"]) * (units.selector_forward + units.load)
    if vibi:
        per_epoch += n["train"] * units.forward
    return cfg.epochs * per_epoch


def _fits_training_labels(ws) -> bool:
    """Whether the black box predicts every training label (then VIBI's selector is XCR's, trained
    once); read from the cached extraction, else assumed not (the dearer case)."""
    ex = ws.extractions
    if not ws.store.exists(ex.KIND, ex.key("train")):
        return False
    train = ex.get("train")
    return bool(np.array_equal(train.preds, train.labels))


def _table1(ws, units: UnitCosts, config: XCRConfig, n: dict[str, int], trained: set) -> tuple[float, dict[str, float]]:
    """Table 1's seconds and its parts; ``trained`` collects the selectors it trains (the
    retraining's own is then cached)."""
    from dataclasses import replace

    from .selector import selector_key

    ks, betas = config.table1_grid()
    if not ks:
        return 0.0, {}
    vibi_target = "labels" if _fits_training_labels(ws) else "blackbox"
    targets = ("labels", vibi_target) if "VIBI" in table1_modes(config) else ("labels",)
    pass_test = n["test"] * (units.selector_forward + 2 * units.forward + units.load)
    selectors, seconds = 0, n["train"] * units.forward  # the VIBI check: the black box on the training split
    for k in ks:
        for beta in betas:
            for target in targets:
                cfg = replace(config.selector, k=k, beta=beta, target=target)
                key = selector_key(ws, cfg)
                if key not in trained and not ws.store.exists("xcr-selector", key):
                    trained.add(key)
                    selectors += 1
                    seconds += _selector_training(units, replace(config, selector=cfg), n, vibi=target == "blackbox")
                seconds += pass_test
        seconds += 2 * n["test"] * units.forward  # random masks
    parts = {f"Table 1: {selectors} selector{'s' if selectors != 1 else ''} to train, {len(ks) * len(betas)} (k, β)": seconds}
    return seconds, parts


def table1_modes(config: XCRConfig) -> tuple[str, ...]:
    """Table 1's rows: every mode of :data:`~cfdebug.xcr.explanations.TABLE1_MODES` for a grid that
    was asked for (``table1_ks``/``table1_betas`` given, as ``report`` and the sweep do); by
    default only the rows that train nothing more than the retraining's own selector (XCR and
    random masks: VIBI needs a selector of its own)."""
    from .explanations import TABLE1_MODES

    explicit = config.table1_ks is not None or config.table1_betas is not None
    return TABLE1_MODES if explicit else tuple(m for m in TABLE1_MODES if m != "VIBI")


def _retraining(ws, units: UnitCosts, config: XCRConfig, n: dict[str, int], trained: set) -> tuple[float, dict[str, float]]:
    from .selector import selector_key

    parts = {}
    own = selector_key(ws, config.selector)
    if own not in trained and not ws.store.exists("xcr-selector", own):
        trained.add(own)
        parts["selector for the retraining"] = _selector_training(units, config, n)
    parts["masks"] = (n["train"] + n["test"]) * (units.selector_forward + units.load)
    steps = math.ceil(n["train"] / units.retrain_batch)
    evaluate = sum(n.values()) * (units.forward + units.load)  # every epoch scores train, val and test
    epoch = {"vanilla": steps * units.vanilla_step, "xcr": steps * units.xcr_step}
    methods = ["vanilla", "xcr"] + (["random"] if config.random_baseline else [])
    seeds, epochs = len(config.seeds), config.retrain.epochs
    for method in methods:
        per_run = epochs * (epoch["vanilla" if method == "vanilla" else "xcr"] + n["train"] * units.load + evaluate) + n["val"] * units.forward
        parts[f"{method} retraining ({seeds} seed{'s' if seeds != 1 else ''} × {epochs} epochs)"] = seeds * per_run
    return sum(parts.values()), parts


def _evaluation(units: UnitCosts, config: XCRConfig, n: dict[str, int]) -> tuple[float, dict[str, float]]:
    models = len(config.seeds) * (3 if config.random_baseline else 2)
    n_c = n["test"] if config.max_corrupt_images is None else min(n["test"], config.max_corrupt_images)
    clean = n["test"] * models * units.scoring
    sets = len(config.corruptions) * len(config.severities)
    generate = sum(units.corruption.get(name, 0.0) for name in config.corruptions) * len(config.severities) * n_c
    corrupted = sets * n_c * models * units.scoring + generate
    parts = {"clean test split": clean}
    if sets:
        parts[f"{sets} corrupted test sets"] = corrupted
    return clean + corrupted, parts


def estimate_xcr(ws, config: XCRConfig, units: UnitCosts | None = None) -> XCREstimate:
    """Seconds :func:`~cfdebug.xcr.run_xcr_report` will take for ``config`` on ``ws``.

    ``units`` defaults to a fresh :func:`measure_unit_costs`. Selectors the store already holds
    cost nothing; a stored report makes the estimate ``cached`` (0 s).
    """
    from .keys import REPORT_KIND, report_key

    if ws.store.exists(REPORT_KIND, report_key(ws, config)):
        return XCREstimate(stages={s: 0.0 for s in STAGES}, parts={}, seconds=0.0, low=0.0, high=0.0, cached=True)
    units = units or measure_unit_costs(ws, config)
    n, trained = _sizes(ws), set()
    table1, parts1 = _table1(ws, units, config, n, trained)
    retrain, parts2 = _retraining(ws, units, config, n, trained)
    evaluate, parts3 = _evaluation(units, config, n)
    stages = {"table1": table1, "retrain": retrain, "evaluate": evaluate}
    total = sum(stages.values())
    return XCREstimate(stages=stages, parts={**parts1, **parts2, **parts3}, seconds=total, low=RANGE[0] * total, high=RANGE[1] * total)


def stage_spans(stages: dict[str, float]) -> dict[str, tuple[float, float]]:
    """The report's progress spans ``{stage: (lo, hi)}`` in proportion to ``stages``' seconds
    (each stage at least 1% of the bar, so every stage shows moving)."""
    weights = [max(float(stages.get(s, 0.0)), 0.0) for s in STAGES]
    total = sum(weights) or 1.0
    floor = [w / total < 0.01 for w in weights]
    rest = sum(w for w, small in zip(weights, floor) if not small) or 1.0
    shares = [0.01 if small else (1.0 - 0.01 * sum(floor)) * w / rest for w, small in zip(weights, floor)]
    spans, lo = {}, 0.0
    for name, share in zip(STAGES, shares):
        hi = min(lo + share, 1.0)
        spans[name] = (lo, hi)
        lo = hi
    spans[STAGES[-1]] = (spans[STAGES[-1]][0], 1.0)
    return spans

