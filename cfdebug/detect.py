"""Misclassification detection by filter agreement (paper A, section 4.2 and Table 1).

For a test image with inferred class ``ĉ``, the local set ``L = MC_x`` comes from ``ĉ``'s MC
head and the global set ``G = h_ĉ > f·max(h_ĉ)`` from :func:`cfdebug.mcfilters.detection_sets`. Their agreement
is measured by recall ``|L∩G|/|G|``, precision ``|L∩G|/|L|`` and F1
(:func:`cfdebug.metrics.set_agreement`).

**Flag rule.** A prediction is *checked* when its confidence is ``≤ skip_threshold`` (a skip
threshold of 0 disables skipping: every prediction is checked), and *flagged* when it is checked,
scorable (``|G| > 0``) and its metric is below its class's threshold. Table 1 has three rows:

====================  ==============  ==============  ==========================================
row                   skip threshold  freq threshold  class threshold
====================  ==============  ==============  ==========================================
Avg. Recall           0.9             0.15            mean training recall of the class
Avg. F1 score         0.9             0.15            mean training F1 of the class
Recall < 0.3          0 (check all)   0 (``h > 0``)   0.3 for every class
====================  ==============  ==============  ==========================================

The "mean training metric" of class ``c`` is the mean metric over the *training* images the
model predicts as ``c`` (the same population and computation as at test time: their MC set from
``c``'s head against ``G_c``); a class with no such image, or an unscorable one, falls back to
0.3. Thresholds are computed from training data only; test labels are read only to count
detected errors.

**Continuous scores** (higher = more likely correct, Hendrycks & Gimpel's convention):
``mc_agreement`` is the *agreement margin*: the F1 agreement at the main frequency threshold
(``score_metric``) minus the class's mean training F1, i.e. the quantity the flag rule
thresholds (an unscorable prediction scores −1, the lowest possible); ``msp`` is the maximum
softmax probability; ``combined`` is the mean of the two scores' percentile ranks within the
evaluated split (rank averaging: scale-free, so neither score dominates by its range; ties get
their mean rank). ``mc_agreement_raw`` (the F1 without the class threshold) is reported too.

**Re-ranking** (the reference code's top-5 proposal): the top-``k`` classes of each image are
scored with their own heads, global sets and training thresholds (agreement margin); the
best-agreeing one is proposed (ties go to the more probable class). ``rerank_fixed`` counts
flagged errors whose proposal is the true class, ``rerank_broken`` flagged correct predictions
whose proposal is another class.

**Ablation** (the causal check of Tariq et al. 2022): zeroing a class's top-``n`` global MC
filters (by histogram) in ``g(x)`` should cut that class's test recall more than zeroing ``n``
random filters (drawn uniformly from all ``C`` filters, averaged over draws; one seeded set of
draws is shared by all classes).
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import metrics
from .cfe import masked_head, masked_predictions, mc_heads, predict_masks, split_head_inputs
# DetectConfig lives in cfdebug.config; this stage module re-exports it (and MCFilterConfig, its part).
from .config import DETECT_ROWS, DetectConfig, MCFilterConfig, check_fraction, check_int  # noqa: F401
from .errors import CfdebugError
from .runtime import Progress, scaled_progress
from .mcfilters import GlobalFilters, detection_sets, global_mc_filters
from .store import jsonable, stable_hash

ROW_LABELS = {"avg_recall": "Avg. Recall", "avg_f1": "Avg. F1 score", "recall_cut": "Recall <{cut:g}"}


# --------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------


def agreement(local: Any, classes: Any, sets: np.ndarray) -> dict[str, np.ndarray]:
    """Recall, precision, F1 of ``local`` [N, C] bool against ``sets[classes]`` ([K, C] bool, ``classes`` [N])."""
    return metrics.set_agreement(local, np.asarray(sets)[np.asarray(classes)])


def class_thresholds(train_metric: Any, train_pred: Any, num_classes: int, fallback: float = 0.3) -> np.ndarray:
    """Per-class mean of a training-set metric over the images predicted as each class.

    Args:
        train_metric: ``[N]`` float, NaN where unscorable (ignored).
        train_pred: ``[N]`` int predicted classes of the training images.

    Returns:
        ``[K]`` float64; ``fallback`` for a class with no scorable prediction.
    """
    check_fraction(fallback, "fallback_threshold")
    m = np.asarray(train_metric, dtype=np.float64)
    pred = np.asarray(train_pred).astype(np.int64)
    ok = ~np.isnan(m)
    sums = np.bincount(pred[ok], weights=m[ok], minlength=num_classes)
    counts = np.bincount(pred[ok], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), fallback)


def flag_predictions(metric: Any, pred: Any, confidence: Any, thresholds: Any, skip_threshold: float) -> dict[str, np.ndarray]:
    """The flag rule on arrays.

    Args:
        metric: ``[N]`` agreement metric (NaN = unscorable); ``pred`` [N] int; ``confidence``
            [N] in [0, 1]; ``thresholds`` [K] per-class thresholds (or a scalar).
        skip_threshold: check only ``confidence ≤ skip_threshold``; 0 checks everything.

    Returns:
        ``{"checked", "unscorable", "flagged"}`` bool ``[N]`` arrays.
    """
    skip = check_fraction(skip_threshold, "skip_threshold")
    m = np.asarray(metric, dtype=np.float64)
    conf = np.asarray(confidence, dtype=np.float64)
    thr = np.asarray(thresholds, dtype=np.float64)
    thr_n = np.full(m.shape, float(thr)) if thr.ndim == 0 else thr[np.asarray(pred).astype(np.int64)]  # [N]
    checked = np.ones(m.shape, bool) if skip == 0.0 else conf <= skip
    unscorable = np.isnan(m)
    with np.errstate(invalid="ignore"):
        below = m < thr_n
    return {"checked": checked, "unscorable": unscorable, "flagged": checked & ~unscorable & below}


def flags_at_margin(result: dict, margin: float = 0.0) -> dict[str, np.ndarray]:
    """The flag rule on a :func:`run_detection` report's per-image ``agreement_margin``, with
    every class threshold moved by ``margin``: flagged when checked (confidence ≤ the report's
    ``skip_threshold``; 0 checks all), scorable and ``agreement_margin < margin``.

    ``margin = 0`` is the rule of the report's ``score_metric`` row (the paper's: below the
    class's mean training agreement); a lower margin flags fewer, more certain errors. Returns
    :func:`flag_predictions`'s ``{"checked", "unscorable", "flagged"}`` bool ``[N]`` arrays.
    """
    images = result["images"]
    metric = np.asarray([np.nan if r["unscorable"] else r["agreement_margin"] for r in images], dtype=np.float64)  # [N]
    pred = np.asarray([r["predicted"] for r in images], dtype=np.int64)
    confidence = np.asarray([r["confidence"] for r in images], dtype=np.float64)
    return flag_predictions(metric, pred, confidence, float(margin), result["config"]["skip_threshold"])


def table1_row(key: str, flags: dict[str, np.ndarray], is_error: np.ndarray, skip: float, freq: float, threshold: Any) -> dict:
    """One row of Table 1 from the flags of :func:`flag_predictions` and ``is_error`` [N] bool."""
    flagged = flags["flagged"]
    total = int(is_error.sum())
    detected = int((flagged & is_error).sum())
    return {
        "metric": key,
        "label": ROW_LABELS[key],
        "skip_threshold": float(skip),
        "freq_threshold": float(freq),
        "threshold": threshold,
        "errors_detected": detected,
        "errors_detected_pct": 100.0 * detected / total if total else float("nan"),
        "new_errors": int((flagged & ~is_error).sum()),
        "flagged": int(flagged.sum()),
        "checked": int(flags["checked"].sum()),
        "unscorable": int(flags["unscorable"].sum()),
    }


def agreement_margin(metric: Any, pred: Any, thresholds: Any) -> np.ndarray:
    """Continuous agreement score ``metric − threshold[pred]`` in ``[−1, 1]`` (``[N]`` float64).

    The margin by which a prediction clears its class's training mean: what the flag rule
    thresholds, and comparable across classes whose global sets differ in size. An unscorable
    prediction (NaN metric) scores −1, the lowest possible.
    """
    m = np.asarray(metric, dtype=np.float64)
    thr = np.asarray(thresholds, dtype=np.float64)[np.asarray(pred).astype(np.int64)]
    return np.where(np.isnan(m), -1.0, m - thr)


def _percentile_rank(x: np.ndarray) -> np.ndarray:
    """Mean rank of each value scaled to (0, 1] (ties share their mean rank)."""
    from scipy.stats import rankdata

    return rankdata(x, method="average") / len(x)


def combined_score(msp: np.ndarray, agreement_score: np.ndarray) -> np.ndarray:
    """``(rank(msp) + rank(agreement)) / 2`` with percentile ranks within the split."""
    return 0.5 * (_percentile_rank(np.asarray(msp, float)) + _percentile_rank(np.asarray(agreement_score, float)))


def _detection_scores(scores: dict[str, np.ndarray], is_error: np.ndarray) -> tuple[dict, dict]:
    auroc, aupr = {}, {}
    both = 0 < int(is_error.sum()) < len(is_error)
    for name, s in scores.items():
        r = metrics.error_detection_scores(s, is_error) if both else {"auroc": float("nan"), "aupr_err": float("nan")}
        auroc[name], aupr[name] = r["auroc"], r["aupr_err"]
    return auroc, aupr


@dataclass
class _Split:
    features: np.ndarray
    logits: np.ndarray
    labels: np.ndarray
    ids: np.ndarray

    @classmethod
    def of(cls, x) -> "_Split":
        return cls(np.asarray(x.features, np.float32), np.asarray(x.logits, np.float64), np.asarray(x.labels).astype(np.int64), np.asarray(x.ids))

    @property
    def probs(self) -> np.ndarray:
        return metrics.softmax(self.logits)


def detect_arrays(heads, filters: GlobalFilters, train: Any, test: Any, config: DetectConfig | None = None) -> dict:
    """Table 1, the detection scores and re-ranking on arrays.

    Args:
        heads: fitted :class:`~cfdebug.cfe.MCHeads`.
        filters: the global MC filters (from the training split).
        train, test: objects with ``features`` [N, C] float32, ``logits`` [N, K], ``labels`` [N]
            int and ``ids`` [N] (an :class:`~cfdebug.extract.Extraction` works). Only
            ``train`` sets thresholds; ``test.labels`` is used only to count errors.

    Returns:
        a dict: ``total_errors``, ``n_images``, ``table1`` (rows), ``auroc``/``aupr_err`` (for
        ``mc_agreement``, ``msp``, ``combined``), ``rerank_fixed``, ``rerank_broken``,
        ``thresholds`` (per row, [K] lists), ``unscorable_classes`` and ``images`` (one dict
        per test image). Nothing is modified in place.
    """
    config = config or DetectConfig()
    tr, te = _Split.of(train), _Split.of(test)
    k = filters.num_classes
    _check_same_model(heads, filters, tr, te)
    tr_pred, te_pred = tr.logits.argmax(1), te.logits.argmax(1)
    te_probs = te.probs
    te_conf = te_probs.max(1)
    is_error = te_pred != te.labels

    tr_local = predict_masks(heads, tr.features, tr_pred)  # [N_train, C]
    te_local = predict_masks(heads, te.features, te_pred)  # [N_test, C]

    sets_main = detection_sets(filters.histogram, config.freq_threshold)
    sets_cut = detection_sets(filters.histogram, config.recall_cut_freq_threshold)
    tr_main, te_main = agreement(tr_local, tr_pred, sets_main), agreement(te_local, te_pred, sets_main)
    te_cut = agreement(te_local, te_pred, sets_cut)

    thresholds = {
        "avg_recall": class_thresholds(tr_main["recall"], tr_pred, k, config.fallback_threshold),
        "avg_f1": class_thresholds(tr_main["f1"], tr_pred, k, config.fallback_threshold),
        "recall_cut": np.full(k, float(config.recall_cut)),
    }
    flags = {
        "avg_recall": flag_predictions(te_main["recall"], te_pred, te_conf, thresholds["avg_recall"], config.skip_threshold),
        "avg_f1": flag_predictions(te_main["f1"], te_pred, te_conf, thresholds["avg_f1"], config.skip_threshold),
        "recall_cut": flag_predictions(te_cut["recall"], te_pred, te_conf, thresholds["recall_cut"], config.recall_cut_skip_threshold),
    }
    score_key = {"recall": "avg_recall", "f1": "avg_f1"}.get(config.score_metric)
    score_thr = thresholds[score_key] if score_key else class_thresholds(tr_main[config.score_metric], tr_pred, k, config.fallback_threshold)
    score = agreement_margin(te_main[config.score_metric], te_pred, score_thr)
    raw = np.nan_to_num(te_main[config.score_metric], nan=0.0)
    scores = {"mc_agreement": score, "msp": te_conf, "combined": combined_score(te_conf, score), "mc_agreement_raw": raw}
    auroc, aupr = _detection_scores(scores, is_error)

    proposal, kk = _rerank(heads, te, sets_main, score_thr, config)
    n = len(te_pred)
    flagged = flags[config.flag_row]["flagged"]
    proposed = np.where(flagged, proposal, te_pred)

    unscorable = np.isnan(te_main["recall"])  # [N]: the predicted class has an empty global set
    empty_classes = np.nonzero(~sets_main.any(1))[0]
    images = _image_rows(te, getattr(test, "paths", None), te_conf, te_main, score, flags, flagged, proposed, unscorable, is_error)
    return {
        "n_images": int(n),
        "total_errors": int(is_error.sum()),
        "accuracy": float(1.0 - is_error.mean()),
        "table1": _table1(flags, is_error, config),
        "auroc": auroc,
        "aupr_err": aupr,
        "score_definitions": _score_definitions(config),
        "rerank_fixed": int((flagged & is_error & (proposal == te.labels)).sum()),
        "rerank_broken": int((flagged & ~is_error & (proposal != te_pred)).sum()),
        "rerank_top_k": int(kk),
        "thresholds": {row: [float(v) for v in thr] for row, thr in thresholds.items()},
        "global_set_sizes": {
            "main": [int(v) for v in sets_main.sum(1)],
            "recall_cut": [int(v) for v in sets_cut.sum(1)],
        },
        "unscorable_classes": [int(i) for i in empty_classes],
        "n_unscorable": int(unscorable.sum()),
        "images": images,
    }


def _check_same_model(heads, filters: GlobalFilters, tr: _Split, te: _Split) -> None:
    """Refuse heads, global filters and splits that do not come from one model (K classes × C filters)."""
    k = filters.num_classes
    if heads.num_classes != k or filters.histogram.shape[1] != heads.channels:
        raise CfdebugError(
            f"Expected the heads ({heads.num_classes} classes × {heads.channels} filters) and the global filters "
            f"({k} × {filters.histogram.shape[1]}) to come from the same model, but they differ."
        )
    for name, split in (("train", tr), ("test", te)):
        if split.logits.shape[1] != k or split.features.shape[1] != heads.channels:
            raise CfdebugError(
                f"Expected `{name}` to have [N, {heads.channels}] features and [N, {k}] logits, but got "
                f"{tuple(split.features.shape)} and {tuple(split.logits.shape)}."
            )


def _table1(flags: dict, is_error: np.ndarray, config: DetectConfig) -> list[dict]:
    """Table 1's three rows (:data:`ROW_LABELS`) from each row's flags and ``is_error`` [N] bool."""
    table = [
        table1_row("avg_recall", flags["avg_recall"], is_error, config.skip_threshold, config.freq_threshold, "class mean of training recall"),
        table1_row("avg_f1", flags["avg_f1"], is_error, config.skip_threshold, config.freq_threshold, "class mean of training F1"),
        table1_row("recall_cut", flags["recall_cut"], is_error, config.recall_cut_skip_threshold, config.recall_cut_freq_threshold, float(config.recall_cut)),
    ]
    table[2]["label"] = ROW_LABELS["recall_cut"].format(cut=config.recall_cut)
    return table


def _score_definitions(config: DetectConfig) -> dict[str, str]:
    """What each continuous score of the report is, in words."""
    return {
        "mc_agreement": (
            f"{config.score_metric} of MC_x vs the global set at freq {config.freq_threshold:g}, minus the class's "
            "mean training value (unscorable → −1)"
        ),
        "msp": "maximum softmax probability",
        "combined": "mean of the percentile ranks of msp and mc_agreement within the split",
        "mc_agreement_raw": f"{config.score_metric} of MC_x vs the global set (unscorable → 0), no class threshold",
    }


def _rerank(heads, te: "_Split", sets_main: np.ndarray, score_thr: np.ndarray, config: DetectConfig) -> tuple[np.ndarray, int]:
    """The class among each prediction's top-k (by logit) whose own head, global set and threshold
    agree most (the most probable on ties): ``proposal`` [N] int, and k."""
    k = score_thr.shape[0]
    top = np.argsort(-te.logits, axis=1, kind="stable")[:, : min(config.rerank_top_k, k)]  # [N, k]
    top_local = predict_masks(heads, te.features, top)  # [N, k, C]
    n, kk, c = top_local.shape
    top_metric = agreement(top_local.reshape(n * kk, c), top.reshape(-1), sets_main)[config.score_metric]
    top_agree = agreement_margin(top_metric, top.reshape(-1), score_thr).reshape(n, kk)  # [N, k]
    best = np.argmax(top_agree, axis=1)  # first (most probable) on ties
    return top[np.arange(n), best], int(kk)


def _image_rows(te, paths, conf, main, score, flags, flagged, proposed, unscorable, is_error) -> list[dict]:
    """One JSON-ready dict per scored image (the per-image table of the report)."""
    return [
        {
            "id": str(te.ids[i]),
            "path": None if paths is None else str(paths[i]),
            "true": int(te.labels[i]),
            "predicted": int(te.logits[i].argmax()),
            "confidence": float(conf[i]),
            "recall": _num(main["recall"][i]),
            "precision": _num(main["precision"][i]),
            "f1": _num(main["f1"][i]),
            "agreement_margin": float(score[i]),
            "flagged": bool(flagged[i]),
            **{f"flagged_{row}": bool(flags[row]["flagged"][i]) for row in DETECT_ROWS},
            "proposed": int(proposed[i]),
            "unscorable": bool(unscorable[i]),
            "error": bool(is_error[i]),
        }
        for i in range(len(te.labels))
    ]


def _num(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


# --------------------------------------------------------------------------------------------
# Ablation
# --------------------------------------------------------------------------------------------


def _predict(head, inputs: Any, channels: int, zero: np.ndarray | None = None) -> np.ndarray:
    """Predictions with the filters ``zero`` set to 0 in every image (none when ``None``)."""
    keep = np.ones((len(inputs), channels), dtype=np.float32)
    if zero is not None:
        keep[:, np.asarray(zero, dtype=np.int64)] = 0.0
    return masked_predictions(head, inputs, keep)


def ablation_arrays(
    head,
    filters: GlobalFilters,
    features: Any,
    labels: Any,
    cls: int | None = None,
    top_n: int = 5,
    n_random_draws: int = 20,
    seed: int = 0,
    head_inputs: Any = None,
) -> dict:
    """Recall drop of class ``cls`` when its top-``n`` global MC filters are zeroed in ``g(x)``
    (in the feature maps, for a head that runs on maps), against the mean drop over
    ``n_random_draws`` random sets of ``n`` filters.

    Args:
        head: frozen head, a pooled module ``[B, C] → [B, K]`` or a
            :class:`~cfdebug.cfe.MaskedHead`; ``features`` [N, C]; ``labels`` [N];
            ``head_inputs`` the feature maps ``[N, C, h, w]`` for a map head.
        cls: a class index, or ``None`` for the mean over every class with a global set and at
            least one image in ``labels``.

    Returns:
        ``mc_recall_drop``, ``random_recall_drop`` (means over the evaluated classes, in
        recall units 0–1), ``mc_accuracy_drop``, ``random_accuracy_drop``, ``per_class`` rows,
        ``classes``, ``top_n``, ``n_random_draws``.
    """
    top_n = check_int(top_n, "top_n")
    n_random_draws = check_int(n_random_draws, "n_random_draws")
    g = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels).astype(np.int64)
    k, c = filters.histogram.shape
    if top_n > c:
        raise CfdebugError(f"Expected `top_n` to be at most the number of filters ({c}), but got {top_n}")
    if cls is not None:
        if isinstance(cls, bool) or not isinstance(cls, numbers.Integral) or not 0 <= cls < k:
            raise CfdebugError(f"Expected `cls` to be a class index in 0..{k - 1} or None, but got {cls!r}")
        classes = [int(cls)]
    else:
        support = np.bincount(y, minlength=k)
        classes = [i for i in range(k) if filters.counts[i] > 0 and support[i] > 0]
    inputs = g if head_inputs is None else head_inputs
    base = _predict(head, inputs, c)
    base_recall = metrics.per_class_recall(base, y, k)
    base_acc = float((base == y).mean())
    for cl in classes:
        if filters.counts[cl] == 0:
            raise CfdebugError(f"Class {cl} has no global MC filters (no confident correct training image), so it cannot be ablated.")
    # The random sets do not depend on the class: one set of draws serves every class, so a
    # class's random baseline is the same whether it is checked alone or with all the others,
    # and the cost is n_random_draws passes instead of one per class and draw.
    rng = np.random.default_rng(seed)
    random_preds = [_predict(head, inputs, c, rng.choice(c, size=top_n, replace=False)) for _ in range(n_random_draws)] if classes else []
    random_recall = [metrics.per_class_recall(pr, y, k) for pr in random_preds]
    random_acc = [base_acc - float((pr == y).mean()) for pr in random_preds]
    rows = []
    for cl in classes:
        top = filters.top_filters(cl, top_n)
        pred = _predict(head, inputs, c, top)
        mc_drop = base_recall[cl] - metrics.per_class_recall(pred, y, k)[cl]
        mc_acc_drop = base_acc - float((pred == y).mean())
        rand_drops = [base_recall[cl] - r[cl] for r in random_recall]
        rows.append(
            {
                "class": cl,
                "filters": [int(f) for f in top],
                "recall_before": _num(base_recall[cl]),
                "mc_recall_drop": _num(mc_drop),
                "random_recall_drop": _num(np.mean(rand_drops)),
                "random_recall_drop_std": _num(np.std(rand_drops)),
                "mc_accuracy_drop": mc_acc_drop,
                "random_accuracy_drop": float(np.mean(random_acc)),
            }
        )

    def mean(key):
        vals = [r[key] for r in rows if r[key] is not None]
        return float(np.mean(vals)) if vals else None

    return {
        "classes": classes,
        "top_n": top_n,
        "n_random_draws": n_random_draws,
        "mc_recall_drop": mean("mc_recall_drop"),
        "random_recall_drop": mean("random_recall_drop"),
        "mc_accuracy_drop": mean("mc_accuracy_drop"),
        "random_accuracy_drop": mean("random_accuracy_drop"),
        "per_class": rows,
    }


def ablation(
    workspace,
    cls: int | None = None,
    top_n: int = 5,
    n_random_draws: int = 20,
    seed: int = 0,
    config: DetectConfig | None = None,
    progress: Progress | None = None,
) -> dict:
    """:func:`ablation_arrays` on the workspace's ``config.split`` (test by default) with its
    cached global MC filters (``cls=None``: mean over classes)."""
    config = config or DetectConfig()
    filters = global_mc_filters(workspace, config.filters, progress)
    ex = workspace.extractions.get(config.split)
    head = masked_head(workspace.target, workspace.device)
    maps = split_head_inputs(workspace, config.split, head, progress)
    return ablation_arrays(head, filters, ex.features, ex.labels, cls, top_n, n_random_draws, seed, maps)


# --------------------------------------------------------------------------------------------
# The whole stage
# --------------------------------------------------------------------------------------------


def report_key(workspace, config: DetectConfig | None = None) -> str:
    """Store key of the workspace's detection report for ``config`` (kind ``"detect"``)."""
    from .cfe import heads_key
    from .config import config_dict

    config = config or DetectConfig()
    return stable_hash(CACHE_KIND, workspace.key_parts, config_dict(config), heads_key(workspace, "mc", config.filters.cfe), _CACHE_VERSION)


def run_detection(workspace, config: DetectConfig | None = None, progress: Progress | None = None, *, should_stop: Callable[[], bool] | None = None) -> dict:
    """Everything paper A's section 4.2 reports, for one workspace, JSON-ready.

    Trains/loads the MC heads and global MC filters (training split only), then scores
    ``config.split``. The report is cached (kind ``"detect"``, keyed by the workspace, the
    config and the heads): the same call again returns the stored report. Returns :func:`detect_arrays`'s dict (``total_errors``, ``table1``,
    ``auroc``, ``aupr_err``, ``rerank_fixed``, ``images`` with ``path`` filled in, …) plus
    ``ablation`` (:func:`ablation_arrays`, averaged over classes unless
    ``config.ablation_class`` is set), ``cfe_keep_rate`` (overall, per class, mean MC filters),
    ``global_filters`` (per-class voting counts, empty classes), ``classes``, ``config`` and
    ``seconds``. NaN values are written as ``None``. ``should_stop`` is polled between the MC heads'
    fit batches (:func:`~cfdebug.cfe.mc_heads`: true stops it with ``RunCancelled``, nothing cached).
    """
    from .config import config_dict

    config = config or DetectConfig()
    start = time.perf_counter()
    if config.ablation_class is not None and config.ablation_class >= workspace.data.num_classes:
        raise CfdebugError(
            f"Expected `ablation_class` to be a class index in 0..{workspace.data.num_classes - 1}, but got {config.ablation_class}"
        )
    if config.split not in workspace.data.splits:
        raise CfdebugError(f"Expected `split` to be one of {', '.join(workspace.data.splits)}, but got {config.split!r}")
    fitted = mc_heads(workspace, config.filters.cfe, scaled_progress(progress, 0.0, 0.6), should_stop=should_stop)
    # The report is an artifact too: a second run (or a fresh dashboard process) reads it back
    # instead of recomputing the ablation, which on a feature-map head costs many passes.
    key = report_key(workspace, config)
    if workspace.store.exists(CACHE_KIND, key):
        if progress:
            progress(1.0, "detection report loaded from the cache")
        return workspace.store.load_meta(CACHE_KIND, key)
    filters = global_mc_filters(workspace, config.filters, scaled_progress(progress, 0.6, 0.7))
    train = workspace.extractions.get("train")
    test = workspace.extractions.get(config.split, progress=scaled_progress(progress, 0.7, 0.8))
    if progress:
        progress(0.8, "scoring agreement")
    split = workspace.data.splits[config.split]
    test_view = _WithPaths(test, split.paths)
    result = detect_arrays(fitted.heads, filters, train, test_view, config)
    head = masked_head(workspace.target, workspace.device)
    if progress:
        progress(0.9, "ablation")
    maps = split_head_inputs(workspace, config.split, head, scaled_progress(progress, 0.9, 0.95))
    result["ablation"] = ablation_arrays(head, filters, test.features, test.labels, config.ablation_class, config.ablation_top_n, config.ablation_draws, config.seed, maps)
    stats = fitted.stats
    result["cfe_keep_rate"] = {
        "overall": _num(fitted.meta.get("keep_rate_overall", float("nan"))),
        "per_class": [_num(v) for v in stats["keep_rate"]],
        "mean_mc_filters": [_num(v) for v in stats["mean_mc_filters"]],
        "mean_mc_filters_overall": _num(fitted.meta.get("mean_mc_filters_overall", float("nan"))),
        "n_correct": [int(v) for v in stats["n_correct"]],
        "fit_seconds": fitted.meta.get("fit_seconds"),
    }
    result["global_filters"] = {
        "counts": [int(v) for v in filters.counts],
        "empty_classes": [int(i) for i in filters.empty_classes],
    }
    result["classes"] = list(workspace.data.classes)
    result["split"] = config.split
    result["config"] = config_dict(config)
    result["seconds"] = time.perf_counter() - start
    result = jsonable(result)
    workspace.store.save_arrays(CACHE_KIND, key, {}, result)
    if progress:
        progress(1.0, "detection done")
    return result


CACHE_KIND = "detect"
_CACHE_VERSION = "v2"  # v2: one set of random ablation draws shared by all classes


@dataclass
class _WithPaths:
    inner: Any
    paths: Any

    def __getattr__(self, name):
        return getattr(self.inner, name)


def images_frame(result: dict):
    """The per-image table of :func:`run_detection` as a pandas DataFrame (the ``--csv`` output);
    bytes of a path that are not UTF-8 (a dataset folder so named) are written as ``\\xNN``."""
    import pandas as pd

    from .data.formats import display_path

    return pd.DataFrame([{**row, "path": display_path(row["path"])} if row.get("path") else row for row in result["images"]])


__all__ = [
    "DetectConfig", "ablation", "ablation_arrays", "agreement", "class_thresholds", "combined_score", "detect_arrays",
    "flag_predictions", "flags_at_margin", "images_frame", "report_key", "run_detection", "table1_row",
]
