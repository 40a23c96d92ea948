"""Global MC filters per class (paper A, eq. 1–3).

For class ``c``, over the training images whose true class is ``c``, that the model predicts as
``c`` with confidence ``p ≥ τ`` (τ = 0.9) and that are *still* predicted ``c`` when only their
MC filters are kept (``g(x) ⊙ MC_x``, binary mask), accumulate

* the histogram ``h_c += MC_x`` (how often each filter is an MC filter of the class), and
* the magnitude ``a_c += g(x) ⊙ MC_x`` (how strongly it fires when it is).

The *global set* of a class has two definitions, one per use, as the papers give them
(METHODS.md, "Global MC filters"):

* detection (paper A, Table 1): ``G_c = h_c > f·max(h_c)`` at the frequency threshold ``f``
  (0.15; ``f = 0`` keeps every filter seen at least once): :func:`detection_sets`;
* treatment (paper A, eq. 4–8): ``G_y = h_y > 0``, every filter that was an MC filter of the
  class at least once: :func:`treatment_sets`.

A class with no voting training image has ``count 0``, ``h_c = 0`` and an empty global set under
both: its predictions are "unscorable" downstream (:mod:`cfdebug.detect`), and only treatment's
λ2 term acts on its images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .cfe import masked_head, masked_predictions, mc_heads, predict_masks, split_head_inputs
from .config import MCFilterConfig, check_fraction
from .errors import CfdebugError
from .runtime import Progress, scaled_progress


@dataclass
class GlobalFilters:
    """Accumulated global MC filters.

    ``histogram`` [K, C] int64 (``h``), ``magnitude`` [K, C] float64 (``a``), ``counts`` [K]
    int64 (training images that voted per class). ``meta`` holds the config and key parts.
    """

    histogram: np.ndarray
    magnitude: np.ndarray
    counts: np.ndarray
    meta: dict = field(default_factory=dict)
    cache_hit: bool = False

    @property
    def num_classes(self) -> int:
        return self.histogram.shape[0]

    @property
    def empty_classes(self) -> np.ndarray:
        """Indices of classes with no voting training image (empty global set, "unscorable")."""
        return np.nonzero(self.counts == 0)[0]

    def sets(self, freq_threshold: float = 0.15) -> np.ndarray:
        """Detection's global sets ``G`` [K, C] bool at ``freq_threshold`` (:func:`detection_sets`)."""
        return detection_sets(self.histogram, freq_threshold)

    def normalised_magnitude(self) -> np.ndarray:
        """``a_c / count_c`` [K, C] float64: mean activation of each filter when it is MC (0 for empty classes)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts[:, None] > 0, self.magnitude / np.maximum(self.counts[:, None], 1), 0.0)

    def top_filters(self, cls: int, n: int) -> np.ndarray:
        """The ``n`` filters of class ``cls`` with the largest histogram (ties by magnitude)."""
        order = np.lexsort((-self.magnitude[cls], -self.histogram[cls]))
        return order[:n]


RANKINGS = ("specificity", "magnitude", "frequency")


def mc_frequency(histogram: Any, counts: Any) -> np.ndarray:
    """``[K, C]`` float64 in [0, 1]: the fraction of a class's voting images in which each filter
    is an MC filter (``h_c / count_c``; 0 for a class with no voting image)."""
    h = np.asarray(histogram, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    if h.ndim != 2 or n.shape != (h.shape[0],):
        raise CfdebugError(f"Expected `histogram` [K, C] and `counts` [K], but got shapes {h.shape} and {n.shape}")
    return np.where(n[:, None] > 0, h / np.maximum(n[:, None], 1), 0.0)


def filter_specificity(histogram: Any, counts: Any) -> np.ndarray:
    """``[K, C]`` float64 in [-1, 1]: a filter's MC frequency in class ``c`` minus its mean MC
    frequency in the other classes that have voting images. A filter that is MC in every image of
    every class (a generic one) scores 0, however often it fires; one kept only for ``c`` scores
    its frequency there."""
    freq = mc_frequency(histogram, counts)
    voting = np.asarray(counts) > 0  # [K]
    total, n_voting = (freq * voting[:, None]).sum(0), int(voting.sum())  # [C], scalar
    others = (total[None, :] - freq * voting[:, None]) / np.maximum(n_voting - voting[:, None].astype(int), 1)  # [K, C]
    return freq - others


def rank_filters(filters: GlobalFilters, cls: int, by: str = "specificity") -> np.ndarray:
    """All filter indices ``[C]`` of class ``cls``, best first, ranked ``by``:

    * ``"specificity"``: :func:`filter_specificity` (ties by magnitude);
    * ``"magnitude"``: the mean activation when MC (:meth:`GlobalFilters.normalised_magnitude`);
    * ``"frequency"``: the histogram, as :meth:`GlobalFilters.top_filters` (ties by magnitude).

    The heatmap's columns and the top-filter list use the same ranking, so their orders agree.
    """
    if by not in RANKINGS:
        raise CfdebugError(f"Expected `by` to be one of {', '.join(RANKINGS)}, but got {by!r}.")
    if not 0 <= cls < filters.num_classes:
        raise CfdebugError(f"Expected `cls` in 0..{filters.num_classes - 1}, but got {cls}.")
    magnitude = filters.normalised_magnitude()[cls]
    if by == "magnitude":
        return np.argsort(-magnitude, kind="stable")
    if by == "frequency":
        return np.lexsort((-magnitude, -filters.histogram[cls]))
    return np.lexsort((-magnitude, -filter_specificity(filters.histogram, filters.counts)[cls]))


def _check_histogram(histogram: Any) -> np.ndarray:
    """``histogram`` as ``[K, C]`` float64, or a :class:`CfdebugError`."""
    h = np.asarray(histogram, dtype=np.float64)
    if h.ndim != 2:
        raise CfdebugError(f"Expected `histogram` to have shape [K, C], but got shape {h.shape}")
    return h


def detection_sets(histogram: Any, freq_threshold: float = 0.15) -> np.ndarray:
    """Detection's global MC sets (paper A, Table 1): ``G_c = h_c > f·max(h_c)``.

    Args:
        histogram: ``[K, C]`` non-negative counts ``h``.
        freq_threshold: ``f`` in ``[0, 1)`` (Table 1's frequency threshold); 0 keeps every filter
            with ``h_c > 0``.

    Returns:
        ``[K, C]`` bool; a row of zeros (a class with no voting image) gives an empty set.
    """
    f = check_fraction(freq_threshold, "freq_threshold", upper_open=True)
    h = _check_histogram(histogram)
    return h > f * h.max(axis=1, keepdims=True)


def treatment_sets(histogram: Any) -> np.ndarray:
    """Treatment's global MC sets (paper A, eq. 4–8; METHODS.md "Treatment"): ``G_y = h_y > 0``.

    Args:
        histogram: ``[K, C]`` non-negative counts ``h`` (or bool sets, returned as they are).

    Returns:
        ``[K, C]`` bool: every filter that was an MC filter of the class at least once.
    """
    return _check_histogram(histogram) > 0


def accumulate_global_filters(
    heads,
    head,
    features: Any,
    labels: Any,
    probs: Any,
    tau: float = 0.9,
    head_inputs: Any = None,
) -> GlobalFilters:
    """Eq. 1–3 on arrays: ``features`` [N, C] float32, ``labels`` [N] int, ``probs`` [N, K] softmax.

    ``heads`` are the fitted :class:`~cfdebug.cfe.MCHeads`; ``head`` the frozen classifier head
    (a pooled module or a :class:`~cfdebug.cfe.MaskedHead`), used for the "still predicted c
    after masking" check, with ``head_inputs`` the feature maps ``[N, C, h, w]`` when it runs on
    maps. Returns :class:`GlobalFilters`.
    """
    tau = check_fraction(tau, "tau")
    g = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels).astype(np.int64)
    p = np.asarray(probs, dtype=np.float64)
    k, c = heads.num_classes, heads.channels
    pred, conf = p.argmax(1), p.max(1)
    idx = np.nonzero((pred == y) & (conf >= tau))[0]
    hist = np.zeros((k, c), dtype=np.int64)
    mag = np.zeros((k, c), dtype=np.float64)
    if idx.size:
        masks = predict_masks(heads, g[idx], y[idx])  # [n, C] MC_x of the true (= predicted) class
        still = masked_predictions(head, g if head_inputs is None else head_inputs, masks, rows=idx) == y[idx]
        idx, masks = idx[still], masks[still]
        np.add.at(hist, y[idx], masks.astype(np.int64))
        np.add.at(mag, y[idx], g[idx].astype(np.float64) * masks)
    counts = np.bincount(y[idx], minlength=k).astype(np.int64)
    return GlobalFilters(histogram=hist, magnitude=mag, counts=counts)


CACHE_KIND = "mcfilters"
_CACHE_VERSION = "v1"


def filters_key(workspace, config: MCFilterConfig | None = None) -> str:
    """Store key of the workspace's global MC filters for ``config`` (they depend on its MC heads)."""
    from .cfe import heads_key
    from .config import config_dict
    from .store import stable_hash

    config = config or MCFilterConfig()
    return stable_hash(CACHE_KIND, workspace.key_parts, config_dict(config), heads_key(workspace, "mc", config.cfe), _CACHE_VERSION)


def global_mc_filters(workspace, config: MCFilterConfig | None = None, progress: Progress | None = None) -> GlobalFilters:
    """The workspace's global MC filters from its training split, cached (kind ``"mcfilters"``).

    Trains (or loads) the MC heads of ``config.cfe`` first. Classes with no voting training
    image are listed in ``meta["empty_classes"]``.
    """
    from .config import config_dict

    config = config or MCFilterConfig()
    fitted = mc_heads(workspace, config.cfe, scaled_progress(progress, 0.0, 0.8))
    key = filters_key(workspace, config)
    hit = workspace.store.exists(CACHE_KIND, key)
    if not hit:
        start = time.perf_counter()
        train = workspace.extractions.get("train")
        head = masked_head(workspace.target, workspace.device)
        maps = split_head_inputs(workspace, "train", head)
        result = accumulate_global_filters(fitted.heads, head, train.features, train.labels, train.probs, config.tau, maps)
        empty = result.empty_classes
        meta = {
            "config": config_dict(config),
            "key_parts": workspace.key_parts,
            "heads_key": fitted.key,
            "classes": list(workspace.data.classes),
            "empty_classes": [int(i) for i in empty],
            "empty_class_names": [workspace.data.classes[i] for i in empty],
            "seconds": time.perf_counter() - start,
        }
        arrays = {"histogram": result.histogram, "magnitude": result.magnitude, "counts": result.counts}
        workspace.store.save_arrays(CACHE_KIND, key, arrays, meta)
    if progress:
        progress(1.0, "global MC filters ready")
    arrays, meta = workspace.store.load_arrays(CACHE_KIND, key)
    return GlobalFilters(histogram=arrays["histogram"], magnitude=arrays["magnitude"], counts=arrays["counts"], meta=meta, cache_hit=hit)


__all__ = [
    "GlobalFilters",
    "MCFilterConfig",
    "accumulate_global_filters",
    "filters_key",
    "global_mc_filters",
    "detection_sets",
    "filter_specificity",
    "mc_frequency",
    "rank_filters",
    "treatment_sets",
]
