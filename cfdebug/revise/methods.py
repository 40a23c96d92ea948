"""Revise runs: each method a fine-tuning kind on the one engine, against the same CE control.

:func:`revise_sweep` fine-tunes, for every seed, the CE control and the method with one schedule
(:class:`~cfdebug.config.ReviseConfig`), selects each run's epoch on counterfactual validation
(:func:`~cfdebug.revise.interventions.counterfactual_validation`), chooses a region's fill there
too (``fill="auto"``, on the first seed), and re-evaluates every kept model on the test split
(:mod:`cfdebug.revise.evaluate`). ``filters-zero`` trains nothing: the user's filters are zeroed
in the classifier head (:func:`zero_filters`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..config import FILTER_METHODS, REGION_METHODS, REVISE_METHODS, FinetuneConfig, ReviseConfig, check_choice, config_dict
from ..errors import CfdebugError
from ..runtime import Progress, scaled_progress
from ..store import torch_save_atomic
from .evaluate import reevaluator
from .interventions import appearance_batches, counterfactual_validation, filter_loss, region_batches, rrr_loss
from .region import FILLS, Region, parse_region

__all__ = ["Declaration", "declare", "most_specific_filters", "zero_filters", "revise_sweep", "validation_key", "MODEL_NAME"]

MODEL_NAME = "model.pt"


@dataclass(frozen=True)
class Declaration:
    """What the user declared not evidence: a method, and its region and/or filters."""

    method: str
    region: Region | None = None
    filters: tuple[int, ...] = ()

    def as_dict(self) -> dict:
        return {"method": self.method, "region": self.region.as_list() if self.region else None, "filters": list(self.filters)}

    def describe(self) -> str:
        parts = [self.method]
        if self.region is not None:
            parts.append(f"region {self.region.text()}")
        if self.filters:
            parts.append(f"filters {','.join(map(str, self.filters))}")
        return ", ".join(parts)


def declare(ws, method: str, region=None, filters: Sequence[int] | None = None) -> Declaration:
    """A validated :class:`Declaration` for the open workspace ``ws`` (input size, filter count).

    A region method needs ``region`` (``"X0,Y0,X1,Y1"`` or four integers, inside the input); a
    filter method needs ``filters`` (indices of the target layer's filters). A region given to the
    other methods is kept for re-evaluation (the Grad-CAM mass and the wrong-class copy); filters
    given to a method that does not use them are dropped.
    """
    check_choice(method, "method", REVISE_METHODS)
    reg = parse_region(region, ws.data.input_size)
    chosen = tuple(int(f) for f in (filters or ())) if method in FILTER_METHODS else ()
    if method in REGION_METHODS and reg is None:
        raise CfdebugError(f"Expected a region for `{method}` (--region X0,Y0,X1,Y1 in the model's input pixels), but got none.")
    if method in FILTER_METHODS and not chosen:
        raise CfdebugError(f"Expected filters for `{method}` (--filters I,J,… : target-layer filter indices), but got none.")
    channels = ws.target.channels
    bad = [f for f in chosen if not 0 <= f < channels]
    if bad:
        raise CfdebugError(f"Expected filter indices in 0..{channels - 1} (the {channels} filters of {ws.target.name}), but got {bad}.")
    if len(set(chosen)) != len(chosen):
        raise CfdebugError(f"Expected distinct filter indices, but {list(chosen)} repeats some.")
    return Declaration(method, reg, tuple(sorted(chosen)))


def most_specific_filters(ws, n: int) -> list[int]:
    """The ``n`` target-layer filters most specific to one class (the highest MC frequency in a
    class minus its mean in the others, :func:`~cfdebug.mcfilters.filter_specificity`, over the
    classes), most specific first: the Class filters page's ranking, for all classes at once."""
    from ..mcfilters import filter_specificity, global_mc_filters

    if not (isinstance(n, int) and 1 <= n <= ws.target.channels):
        raise CfdebugError(f"Expected the number of filters in 1..{ws.target.channels}, but got {n!r}.")
    filters = global_mc_filters(ws)
    best = filter_specificity(filters.histogram, filters.counts).max(axis=0)  # [C]
    return [int(f) for f in np.argsort(-best, kind="stable")[:n]]


def zero_filters(ws, filters: Sequence[int]) -> nn.Module:
    """A copy of ``ws.model`` whose head ignores ``filters``: their input columns of the first
    linear layer after the target are zero (exactly "the filters' pooled activations are 0" for a
    GAP + linear head; for VGG's 7×7 head, the filters' 49 columns each). No training."""
    target = ws.target
    head = target.pooled_head if target.pooled_head is not None else target.map_head
    linear = next((m for m in (head.modules() if head is not None else []) if isinstance(m, nn.Linear)), None)
    name = next((n for n, m in ws.model.named_modules() if m is linear), None) if linear is not None else None
    if name is None:
        raise CfdebugError(
            f"Cannot zero filters in {type(ws.model).__name__}: no linear layer after {target.name!r} takes the pooled filters. "
            "Use the `filters` method (fine-tuning) instead."
        )
    per = linear.in_features // target.channels
    if per * target.channels != linear.in_features:
        raise CfdebugError(f"Cannot map the {target.channels} filters of {target.name!r} onto the {linear.in_features} inputs of {name!r}.")
    model = copy.deepcopy(ws.model).eval()
    weight = dict(model.named_modules())[name].weight
    with torch.no_grad():
        for f in filters:
            weight[:, f * per : (f + 1) * per] = 0
    return model


def _training(ws, decl: Declaration, config: ReviseConfig, fill: str | None, sets: np.ndarray | None):
    """``(batch_transform, loss_fn)`` of the method (``None`` for the CE control's defaults)."""
    ts = ws.data.torch_split("train")
    if decl.method == "region-counterfactual":
        return region_batches(decl.region, fill, ts.mean, ts.std), None
    if decl.method == "region-rrr":
        return rrr_loss(decl.region, config.rrr_lambda)
    if decl.method == "appearance":
        return appearance_batches(config.jitter, ts.mean, ts.std), None
    if decl.method == "filters":
        return None, filter_loss(decl.filters, sets, config.filter_lambda, config.lambda1, 0.5, torch.device(ws.device))
    raise CfdebugError(f"The method {decl.method!r} trains nothing.")


def _best_row(result) -> dict:
    return next(r for r in result.history if r["epoch"] == result.best_epoch)


def _run(ws, decl, config, kind: str, evaluate, reevaluate, fill, sets, run_dir, registry, run_id, progress) -> dict:
    """One fine-tune (``kind``: "control" or the method) and its re-evaluation; a record."""
    from ..training import finetune

    transform, loss_fn = (None, None) if kind == "control" else _training(ws, decl, config, fill, sets)
    sub = None if run_dir is None else Path(run_dir) / f"{kind}{'-' + fill if fill and kind != 'control' else ''}-seed{config.seed}"
    result = finetune(
        ws, config, loss_fn=loss_fn, batch_transform=transform, evaluate=evaluate, run_dir=sub, resume=sub is not None,
        fingerprint={"revise": decl.as_dict(), "kind": kind, "fill": fill}, registry=registry, run_id=run_id, progress=progress,
        tag={"part": kind, "seed": config.seed},
    )
    best = _best_row(result)
    record = {"seed": config.seed, "kind": kind, "fill": fill if kind != "control" else None, "best_epoch": result.best_epoch,
              "val_acc": best["val_acc"], "val_loss": best["val_loss"], "plain_val_acc": best["plain_val_acc"], "history": result.history}
    record.update(reevaluate(result.model))
    if sub is not None:
        torch_save_atomic(result.state_dict, sub / MODEL_NAME)
        record["weights"] = str(sub / MODEL_NAME)
    return record


def revise_sweep(
    ws,
    decl: Declaration,
    seeds: Sequence[int],
    config: ReviseConfig | None = None,
    *,
    run_dir: str | Path | None = None,
    registry=None,
    run_id: str | None = None,
    progress: Progress | None = None,
    controls: dict | None = None,
) -> dict:
    """The CE control and the method for every seed, with one schedule; see the module docstring.

    ``controls``: a dict shared by several sweeps on the same workspace and schedule (``report``
    judging several methods): a control run is kept there under its seed and validation
    (:func:`validation_key`) and reused by the next method validated the same way.

    Returns ``{"declaration", "config", "fill", "fill_scores", "control": [record per seed],
    "method": [record per seed] (one record, seed ``None``, for ``filters-zero``), "base":
    re-evaluation of the base model}``. A record holds ``seed``, ``best_epoch``, ``val_acc`` and
    ``val_loss`` (counterfactual validation: what chose the epoch), ``plain_val_acc``, ``history``,
    ``weights`` (its ``model.pt`` under ``run_dir``) and the re-evaluation
    (:func:`~cfdebug.revise.evaluate.reevaluator`: test predictions and accuracy, Grad-CAM share in
    the region, predictions on the wrong-class copy).
    """
    config = config or ReviseConfig()
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise CfdebugError("Expected at least one seed, but got none.")
    evaluate = counterfactual_validation(ws, decl.method, decl.region, decl.filters, config.jitter)
    reevaluate = reevaluator(ws, decl.region)
    sets = _training_sets(ws) if decl.method == "filters" else None
    plan = _plan(decl, config, seeds)
    done, records = 0, {"control": [], "method": [], "trials": []}
    fill = None if decl.method != "region-counterfactual" else (None if config.fill == "auto" else config.fill)
    fill_scores = {}
    for kind, seed, trial_fill in plan:
        if kind == "method" and decl.method == "region-counterfactual" and trial_fill is None:
            trial_fill = fill
        part = scaled_progress(progress, done / len(plan), (done + 1) / len(plan), f"run {done + 1}/{len(plan)} ({kind}{', fill ' + trial_fill if trial_fill else ''}, seed {seed}): ")
        key = (validation_key(decl, config), seed, _schedule(config))
        if kind == "control" and controls is not None and key in controls:
            rec = controls[key]
        else:
            rec = _run(ws, decl, replace(config, seed=seed), "control" if kind == "control" else decl.method, evaluate, reevaluate,
                       trial_fill, sets, run_dir, registry, run_id, part)
            if kind == "control" and controls is not None:
                controls[key] = rec
        done += 1
        if kind == "trial":  # a fill tried on the first seed
            fill_scores[trial_fill] = (rec["val_acc"], -rec["val_loss"])
            records["trials"].append(rec)
            if len(fill_scores) == len(FILLS):
                fill = max(FILLS, key=lambda f: fill_scores[f])  # counterfactual validation; first on ties
                records["method"].append(next(r for r in records["trials"] if r["fill"] == fill))
            continue
        records[kind].append(rec)
    if decl.method == "filters-zero":
        records["method"] = [_zeroed_record(ws, decl, evaluate, reevaluate)]
    records["method"].sort(key=lambda r: r["seed"] if r["seed"] is not None else -1)
    return {"declaration": decl.as_dict(), "config": config_dict(config), "fill": fill,
            "fill_scores": {f: {"val_acc": v[0], "val_loss": -v[1]} for f, v in fill_scores.items()},
            "control": records["control"], "method": records["method"], "base": reevaluate(ws.model)}


def _schedule(config: ReviseConfig) -> tuple:
    """The fields that shape a CE control run (the method's own knobs do not)."""
    return tuple(getattr(config, f.name) for f in fields(FinetuneConfig) if f.name != "seed")


def validation_key(decl: Declaration, config: ReviseConfig) -> tuple:
    """What a run's counterfactual validation depends on: two declarations with the same key select
    the CE control's epoch alike, so they share its runs."""
    if decl.method in REGION_METHODS:
        return ("region", tuple(decl.region.as_list()))
    if decl.method in FILTER_METHODS:
        return ("filters", decl.filters)
    return ("appearance", config.jitter)


def _plan(decl: Declaration, config: ReviseConfig, seeds: list[int]) -> list[tuple[str, int, str | None]]:
    """The runs in order: per seed the control, then the method (the first seed tries every fill
    when the fill is chosen on validation)."""
    plan = []
    for i, seed in enumerate(seeds):
        plan.append(("control", seed, None))
        if decl.method == "filters-zero":
            continue
        if decl.method == "region-counterfactual" and config.fill == "auto" and i == 0:
            plan += [("trial", seed, f) for f in FILLS]
        else:
            plan.append(("method", seed, None))
    return plan


def _zeroed_record(ws, decl: Declaration, evaluate, reevaluate) -> dict:
    model = zero_filters(ws, decl.filters)
    scores = evaluate(model)
    return {"seed": None, "kind": "filters-zero", "fill": None, "best_epoch": 0, "val_acc": scores["val_acc"], "val_loss": scores["val_loss"],
            "plain_val_acc": scores["plain_val_acc"], "history": [], **reevaluate(model)}


def _training_sets(ws) -> np.ndarray:
    from ..treatment import training_sets

    return training_sets(ws)
