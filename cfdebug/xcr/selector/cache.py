"""The trained selector and its masks as workspace artifacts: cache keys, ``xcr-selector/<key>``
(both networks' weights, history, config) and ``xcr-masks/<key>`` (one split's masks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ...config import SelectorConfig, config_dict
from ...errors import CfdebugError
from ...runtime import Progress
from ...store import stable_hash
from ...training import cpu_state
from .evaluation import selector_maps
from .networks import Approximator, PatchSelector
from .training import train_selector


MASKS_KIND = "xcr-masks"
SELECTOR_KIND = "xcr-selector"
# Bumped when the networks or the training loop change, so stale cache entries are not reused.
FORMAT_VERSION = "xcr-selector-v2"  # v2: ResNet-style networks, lr schedule, straight-through mask


def _training_fields(config: SelectorConfig) -> dict:
    """The config fields training depends on: all but ``mode`` (a Topk and a Softmax run share
    one trained selector; ``mode`` only picks the map that :func:`selector_masks` stores)."""
    fields = config_dict(config)
    fields.pop("mode")
    return fields


def selector_key(workspace, config: SelectorConfig) -> str:
    """Cache key of the trained selector: the workspace's inputs and the training fields."""
    return stable_hash(SELECTOR_KIND, FORMAT_VERSION, workspace.key_parts, _training_fields(config))


def masks_key(workspace, config: SelectorConfig, split: str) -> str:
    """Cache key of one split's masks."""
    return stable_hash(MASKS_KIND, FORMAT_VERSION, workspace.key_parts, config_dict(config), split)


def trained_selector(workspace, config: SelectorConfig, progress: Progress | None = None, should_stop: Callable[[], bool] | None = None):
    """The trained ``(selector, approximator, meta)`` for ``config``, from the cache or trained now.

    ``meta`` holds ``config``, ``history``, ``num_classes`` and ``cache_hit``. The weights
    are stored under ``xcr-selector/<selector_key>`` as ``selector.pt`` / ``approximator.pt``
    and read back with ``torch.load(weights_only=True)``.
    """
    store, key = workspace.store, selector_key(workspace, config)
    num_classes = workspace.data.num_classes
    if store.exists(SELECTOR_KIND, key):
        meta = store.load_meta(SELECTOR_KIND, key)
        folder = store.path(SELECTOR_KIND, key)
        selector = PatchSelector(config.patch_size, 3, config.width)
        approximator = Approximator(meta["num_classes"], 3, config.width)
        selector.load_state_dict(torch.load(folder / "selector.pt", map_location="cpu", weights_only=True))
        approximator.load_state_dict(torch.load(folder / "approximator.pt", map_location="cpu", weights_only=True))
        return selector.to(workspace.device).eval(), approximator.to(workspace.device).eval(), dict(meta, cache_hit=True)
    selector, approximator, history = train_selector(workspace, config, progress, should_stop)
    meta = {
        "config": _training_fields(config),
        "key_parts": workspace.key_parts,
        "num_classes": num_classes,
        "history": history.as_dict(),
        "format": FORMAT_VERSION,
    }
    with store.writer(SELECTOR_KIND, key, meta) as tmp:
        torch.save(cpu_state(selector), tmp / "selector.pt")
        torch.save(cpu_state(approximator), tmp / "approximator.pt")
    return selector, approximator, dict(meta, cache_hit=False)


@dataclass(frozen=True, eq=False)
class SelectorMasks:
    """One split's explanation masks.

    Attributes:
        masks: ``[N, d]`` bool, hard top-k (exactly ``k`` True per row), dataset order.
        probs: ``[N, d]`` float32 softmax map ``p(x)`` when ``config.mode == "Softmax"``
            (the mask that mode applies), else ``None``.
        meta: the stored metadata (config, split, selector key and training history).
        cache_hit: whether the masks were read from the cache.
    """

    masks: np.ndarray
    probs: np.ndarray | None
    meta: dict
    cache_hit: bool


def selector_masks(workspace, config: SelectorConfig, split: str, progress: Progress | None = None, should_stop: Callable[[], bool] | None = None) -> SelectorMasks:
    """Masks of ``split`` from the selector trained with ``config``; cached under ``xcr-masks``.

    On a miss the selector is taken from :func:`trained_selector` (trained and cached when
    needed), run over the split in batches on the workspace device, and the masks are stored
    atomically. ``split`` is one of the workspace data's splits (``train``, ``val``, ``test``).
    """
    if split not in workspace.data.splits:
        raise CfdebugError(f"Expected `split` to be one of {', '.join(workspace.data.splits)}, but got {split!r}")
    store, key = workspace.store, masks_key(workspace, config, split)
    hit = store.exists(MASKS_KIND, key)
    if not hit:
        selector, _, sel_meta = trained_selector(workspace, config, progress, should_stop)
        soft = config.mode == "Softmax"
        masks, probs = selector_maps(selector, workspace.data.torch_split(split), config.k, workspace.device, 256, soft)
        meta = {
            "config": config_dict(config),
            "split": split,
            "key_parts": workspace.key_parts,
            "selector_key": selector_key(workspace, config),
            "history": sel_meta["history"],
            "d": int(masks.shape[1]),
            "format": FORMAT_VERSION,
        }
        arrays = {"masks": masks} if probs is None else {"masks": masks, "probs": probs}
        store.save_arrays(MASKS_KIND, key, arrays, meta)
    arrays, meta = store.load_arrays(MASKS_KIND, key)
    return SelectorMasks(masks=arrays["masks"], probs=arrays.get("probs"), meta=meta, cache_hit=hit)
