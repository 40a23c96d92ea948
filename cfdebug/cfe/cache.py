"""The cached CFE heads of a workspace: fitted on a cache miss, stored, loaded and verified.

:func:`mc_heads` and :func:`mi_heads` are the entry points the detection, the global MC filters,
the dashboard and prepare runs use: the heads of ``workspace`` for a :class:`~cfdebug.config.CFEConfig`,
keyed by the workspace's key parts and the config (:func:`heads_key`), fitted on its training
split (:mod:`~cfdebug.cfe.fitting`) when the store has none. Heads whose parameters are not
finite are never stored (and a stored entry that has them is discarded).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..config import CFEConfig, config_dict
from ..errors import CfdebugError
from ..runtime import Progress, scaled_progress
from ..store import stable_hash
from .classifier_head import masked_head, split_head_inputs
from .fitting import fit_mc_heads, fit_mi_heads
from .heads import MCHeads, MIHeads, keep_rate

__all__ = ["CACHE_KIND", "FittedHeads", "heads_key", "mc_heads", "mi_heads"]


@dataclass
class FittedHeads:
    """Heads of one kind (``"mc"`` or ``"mi"``) for a workspace, with their training record.

    ``stats`` holds numpy arrays (MC: :func:`~cfdebug.cfe.heads.keep_rate`'s per-class arrays); ``meta`` is the
    stored ``meta.json`` (config, history, fit seconds, key parts).
    """

    heads: MCHeads | MIHeads
    stats: dict[str, np.ndarray] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    cache_hit: bool = False
    key: str = ""


CACHE_KIND = "cfe"
_CACHE_VERSION = "v1"


def heads_key(workspace, kind: str, config: CFEConfig) -> str:
    """Store key of ``kind`` (``mc``/``mi``) heads: the workspace's key parts and the config."""
    return stable_hash(CACHE_KIND, kind, workspace.key_parts, config_dict(config), _CACHE_VERSION)


def _check_finite_heads(arrays: dict[str, np.ndarray], kind: str) -> None:
    """Refuse to store (or use) heads whose parameters are not finite: their masks would be garbage."""
    bad = [name for name in ("weight", "bias", "shift", "scale") if not np.isfinite(arrays[name]).all()]
    if bad:
        raise CfdebugError(
            f"Expected finite {kind.upper()} head parameters, but {', '.join(bad)} are not finite (NaN or inf; the CFE fit "
            "diverged). Nothing was cached; lower the CFE learning rate or check the extracted features."
        )


def _load_heads(workspace, kind: str, key: str, cls, config: CFEConfig) -> FittedHeads:
    arrays, meta = workspace.store.load_arrays(CACHE_KIND, key)
    try:
        _check_finite_heads(arrays, kind)
    except CfdebugError:  # stored before this check existed: drop it so the next run refits
        workspace.store.discard(CACHE_KIND, key, "its head parameters are not finite")
        raise
    w = torch.from_numpy(np.array(arrays.pop("weight")))
    heads = cls(w.shape[0], w.shape[1], config.mask_threshold) if cls is MCHeads else cls(w.shape[0], w.shape[1])
    with torch.no_grad():
        heads.weight.copy_(w)
        heads.bias.copy_(torch.from_numpy(np.array(arrays.pop("bias"))))
        heads.shift.copy_(torch.from_numpy(np.array(arrays.pop("shift"))))
        heads.scale.copy_(torch.from_numpy(np.array(arrays.pop("scale"))))
    heads = heads.to(workspace.device).eval()
    return FittedHeads(heads=heads, stats=arrays, history=meta.get("history", []), meta=meta, cache_hit=True, key=key)


def _fit_and_store(workspace, kind: str, key: str, config: CFEConfig, progress: Progress | None, should_stop: Callable[[], bool] | None) -> None:
    """Fit ``kind`` heads on the workspace's training split and store them under ``key`` (MC
    heads with :func:`~cfdebug.cfe.heads.keep_rate`'s per-class arrays)."""
    head = masked_head(workspace.target, workspace.device)
    train = workspace.extractions.get("train", progress=scaled_progress(progress, 0.0, 0.05))
    maps = split_head_inputs(workspace, "train", head, scaled_progress(progress, 0.05, 0.1))
    fit = fit_mc_heads if kind == "mc" else fit_mi_heads
    start = time.perf_counter()
    fit_progress = scaled_progress(progress, 0.1, 0.95 if kind == "mc" else 1.0)
    heads, history = fit(train.features, head, workspace.data.num_classes, config, workspace.device, fit_progress, maps, should_stop=should_stop)
    meta = {
        "kind": kind,
        "head": head.kind,
        "config": config_dict(config),
        "key_parts": workspace.key_parts,
        "classes": list(workspace.data.classes),
        "history": history,
        "fit_seconds": time.perf_counter() - start,
    }
    arrays = {
        "weight": heads.weight.detach().cpu().numpy(),
        "bias": heads.bias.detach().cpu().numpy(),
        "shift": heads.shift.cpu().numpy(),
        "scale": heads.scale.cpu().numpy(),
    }
    if kind == "mc":
        stats = keep_rate(heads, head, train.features, train.labels, train.preds, workspace.data.num_classes, maps)
        meta.update(keep_rate_overall=stats["overall"], mean_mc_filters_overall=stats["overall_mean_mc_filters"])
        arrays.update(keep_rate=stats["keep_rate"], mean_mc_filters=stats["mean_mc_filters"], n_correct=stats["n_correct"])
    _check_finite_heads(arrays, kind)
    workspace.store.save_arrays(CACHE_KIND, key, arrays, meta)


def mc_heads(workspace, config: CFEConfig | None = None, progress: Progress | None = None, *, should_stop: Callable[[], bool] | None = None) -> FittedHeads:
    """The workspace's MC heads, trained on its training split on a cache miss and stored.

    Stored under kind ``"cfe"``: ``weight`` [K, C, C], ``bias`` [K, C], and the per-class
    ``keep_rate``, ``mean_mc_filters`` and ``n_correct`` of :func:`~cfdebug.cfe.heads.keep_rate`
    on the training split; ``meta.json`` holds the config, the loss history and the fit time.
    ``should_stop`` reaches the fit (:func:`~cfdebug.cfe.fitting.fit_mc_heads`): polled between
    batches, it cancels a long fit with :class:`~cfdebug.runs.RunCancelled`, and nothing is
    stored. A background run passes ``lambda: registry.cancel_requested(run_id)``.
    """
    config = config or CFEConfig()
    key = heads_key(workspace, "mc", config)
    hit = workspace.store.exists(CACHE_KIND, key)
    if not hit:
        _fit_and_store(workspace, "mc", key, config, progress, should_stop)
        if progress:
            progress(1.0, "MC heads stored")
    result = _load_heads(workspace, "mc", key, MCHeads, config)
    result.cache_hit = hit
    return result


def mi_heads(workspace, config: CFEConfig | None = None, progress: Progress | None = None, *, should_stop: Callable[[], bool] | None = None) -> FittedHeads:
    """The workspace's MI heads (one per alter class), cached like :func:`mc_heads`."""
    config = config or CFEConfig()
    key = heads_key(workspace, "mi", config)
    hit = workspace.store.exists(CACHE_KIND, key)
    if not hit:
        _fit_and_store(workspace, "mi", key, config, progress, should_stop)
    result = _load_heads(workspace, "mi", key, MIHeads, config)
    result.cache_hit = hit
    return result
