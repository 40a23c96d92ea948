"""Cached helpers for the sample browser and the pages that show where a model looks.

Pages place what these return: per-prediction tables, Grad-CAM maps and region overlays (the
receptive region of a filter as an outline over the image), the share of Grad-CAM mass in the
demo's corner square, and the latest treatment run's per-image predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import CfdebugError
from .cache import memo
from .errors import show_user_error
from .filters import _batch, gradcam_maps, ws_key
from .workspace import extraction, sample_images, shown

SPLITS = ("test", "train")
OUTCOMES = ("all", "correct", "error")
FLAG_CHOICES = ("all", "flagged", "not flagged")
SORTS = {
    "confidence ↑": ("confidence", True),
    "confidence ↓": ("confidence", False),
    "agreement ↑": ("agreement", True),
    "agreement ↓": ("agreement", False),
    "index": ("index", True),
}


def predictions(ws, split: str, detection: dict | None = None, rule: tuple[str, float] | None = None) -> pd.DataFrame:
    """One row per image of ``split`` (index = position in the split): ``id``, ``true``,
    ``predicted``, ``confidence`` [0, 1], ``correct``; for the test split with a ``detection``
    report also ``agreement`` (agreement − class mean), ``flagged`` (by ``rule``,
    :func:`flags_by_rule`; default the report's own flags) and ``proposed`` (the re-ranked class).
    Train predictions have no agreement score (NaN) and are never flagged."""
    ex = extraction(ws, split)
    conf = ex.probs.max(1)
    table = pd.DataFrame({
        "id": [str(i).split("/")[-1] for i in ws.data.splits[split].ids], "true": ex.labels.astype(int),
        "predicted": ex.preds.astype(int), "confidence": conf.astype(float), "correct": ex.preds == ex.labels,
    })
    if split == "test" and detection is not None:
        margin = np.asarray([r["agreement_margin"] for r in detection["images"]], float)
        table["agreement"] = margin
        table["flagged"] = flags_by_rule(detection, rule) if rule else np.asarray([r["flagged"] for r in detection["images"]])
        table["proposed"] = [int(r["proposed"]) for r in detection["images"]]
    else:
        table["agreement"], table["flagged"], table["proposed"] = np.nan, False, table["predicted"]
    return table


#: Session state: the flag rule the user chose on the Flagged page, ``(rule, value)``: ``("budget",
#: fraction)`` or ``("paper", threshold)``; every page that shows flags uses it (the Flagged page
#: also keeps it in its URL).
FLAG_RULE_KEY = "cfdebug_flag_rule"


def choose_flag_rule(rule: str, value: float) -> None:
    """Keep the Flagged page's rule for the other pages (:func:`chosen_flag_rule`)."""
    import streamlit as st

    st.session_state[FLAG_RULE_KEY] = (rule, float(value))


def chosen_flag_rule() -> tuple[str, float]:
    """The flag rule the user chose (:func:`choose_flag_rule`), by default the review budget of
    :data:`cfdebug.claims.DEFAULT_BUDGET`."""
    import streamlit as st

    from ..claims import DEFAULT_BUDGET

    return st.session_state.get(FLAG_RULE_KEY, ("budget", DEFAULT_BUDGET))


def describe_flag_rule(rule: tuple[str, float]) -> str:
    """``"review budget 10%"`` or ``"paper rule, threshold 0"``."""
    kind, value = rule
    return f"review budget {value:.0%}" if kind == "budget" else f"paper rule, threshold {value:g}"


def flags_by_rule(detection: dict, rule: tuple[str, float]) -> np.ndarray:
    """``[N]`` bool: the test predictions of a :func:`~cfdebug.detect.run_detection` report that
    ``rule`` flags (:func:`chosen_flag_rule`): the budget's lowest agreement margins, or the
    paper's rule at its threshold."""
    from ..claims import budget_flags
    from ..detect import flags_at_margin

    kind, value = rule
    if kind == "budget":
        return budget_flags(np.asarray([r["agreement_margin"] for r in detection["images"]], float), value)
    return np.asarray(flags_at_margin(detection, value)["flagged"], bool)


def flagged_export(images: pd.DataFrame, flagged, checked, rule: str, classes) -> pd.DataFrame:
    """The Flagged view's per-image CSV as the screen shows it: ``flagged``/``checked`` [N] bool are
    the current rule's (``rule`` names it and its setting, in every row); the report's own
    paper-rule flags stay as ``flagged_paper_rule``; classes by name. ``images`` is not changed."""
    name = lambda k: classes[int(k)]  # noqa: E731
    out = images.rename(columns={"flagged": "flagged_paper_rule"}).assign(flagged=np.asarray(flagged, bool), checked=np.asarray(checked, bool), rule=rule)
    return out.assign(true=out["true"].map(name), predicted=out["predicted"].map(name), proposed=out["proposed"].map(name))


@dataclass(frozen=True)
class Selection:
    """What the browser shows; every field round-trips through the URL (:meth:`to_query`)."""

    split: str = "test"
    true: tuple[int, ...] = ()
    predicted: tuple[int, ...] = ()
    outcome: str = "all"
    flag: str = "all"
    conf_lo: float = 0.0
    conf_hi: float = 1.0
    sort: str = "confidence ↑"

    @classmethod
    def from_query(cls, q, num_classes: int) -> "Selection":
        def ints(key):
            out = []
            for part in (q.get(key) or "").split(","):
                if part.strip().isdigit() and int(part) < num_classes:
                    out.append(int(part))
            return tuple(sorted(set(out)))

        def fraction(key, default):
            try:
                return min(max(float(q.get(key, default)), 0.0), 1.0)
            except ValueError:
                return default

        pick = lambda key, choices, default: q.get(key) if q.get(key) in choices else default  # noqa: E731
        return cls(split=pick("split", SPLITS, "test"), true=ints("true"), predicted=ints("pred"), outcome=pick("outcome", OUTCOMES, "all"),
                   flag=pick("flag", FLAG_CHOICES, "all"), conf_lo=fraction("conf_lo", 0.0), conf_hi=fraction("conf_hi", 1.0),
                   sort=pick("sort", SORTS, "confidence ↑"))

    def to_query(self) -> dict[str, str]:
        """Only the fields that differ from the defaults (short links)."""
        default, out = Selection(), {}
        for key, name in (("split", "split"), ("outcome", "outcome"), ("flag", "flag"), ("sort", "sort")):
            if getattr(self, key) != getattr(default, key):
                out[name] = getattr(self, key)
        for key, name in (("true", "true"), ("predicted", "pred")):
            if getattr(self, key):
                out[name] = ",".join(map(str, getattr(self, key)))
        if (self.conf_lo, self.conf_hi) != (0.0, 1.0):
            out["conf_lo"], out["conf_hi"] = f"{self.conf_lo:g}", f"{self.conf_hi:g}"
        return out


QUERY_KEYS = ("split", "true", "pred", "outcome", "flag", "conf_lo", "conf_hi", "sort")


def select(table: pd.DataFrame, sel: Selection) -> pd.DataFrame:
    """The rows of :func:`predictions`' table that ``sel`` keeps, in its sort order."""
    keep = (table["confidence"] >= sel.conf_lo) & (table["confidence"] <= sel.conf_hi)
    if sel.true:
        keep &= table["true"].isin(sel.true)
    if sel.predicted:
        keep &= table["predicted"].isin(sel.predicted)
    if sel.outcome != "all":
        keep &= table["correct"] == (sel.outcome == "correct")
    if sel.flag != "all":
        keep &= table["flagged"] == (sel.flag == "flagged")
    column, ascending = SORTS[sel.sort]
    out = table[keep]
    if column == "index":
        return out
    return out.sort_values(column, ascending=ascending, kind="stable", na_position="last")


def corner_share(ws) -> dict | None:
    """How much of the Grad-CAM mass (toward the predicted class, test split) lies in the demo's
    corner square, against the square's share of the image area. ``None`` unless the data are an
    embedded digits bed at 32 px. Returns ``{"area", "mean", "mean_errors", "mean_correct",
    "n"}`` (shares in [0, 1])."""
    from ..data.digits import SQUARE
    from ..gradcam import region_share

    if ws.config.data.source not in ("biased-digits", "hard-digits") or ws.data.input_size != 32:
        return None

    def compute():
        test = extraction(ws, "test")
        maps = gradcam_maps(ws, "test", np.arange(len(test.labels)), test.preds)
        share = region_share(maps, *SQUARE)
        area = (SQUARE[0].stop - SQUARE[0].start) * (SQUARE[1].stop - SQUARE[1].start) / float(maps.shape[1] * maps.shape[2])
        wrong = test.preds != test.labels
        return {"area": area, "mean": float(share.mean()), "mean_errors": float(share[wrong].mean()) if wrong.any() else float("nan"),
                "mean_correct": float(share[~wrong].mean()), "n": int(len(share))}

    return memo(("corner-share", ws_key(ws)), compute)


def filter_regions(ws, split: str, indices, filter_index: int) -> list[np.ndarray]:
    """Where ``filter_index`` fires (≥ half its peak) in images ``indices``, outlined over the image
    (uint8 ``[4H, 4W, 3]``), cached (:func:`~cfdebug.ui.cache.memo`); an image that may not be
    shown stays withheld."""
    from ..gradcam import filter_maps

    indices = tuple(int(i) for i in indices)

    def compute():
        return filter_maps(ws.model, ws.target.name, _batch(ws, split, indices), int(filter_index), ws.device, ws.target.activation)

    try:
        maps = memo(("filter-maps", ws_key(ws), split, indices, int(filter_index)), compute, max_entries=32)
    except CfdebugError as exc:
        show_user_error(exc)
    return _regions(ws, split, indices, maps)


def gradcam_regions(ws, split: str, indices, targets) -> list[np.ndarray]:
    """Grad-CAM toward ``targets`` as outlined regions (≥ half the peak) over the images."""
    return _regions(ws, split, indices, gradcam_maps(ws, split, indices, targets))


def _regions(ws, split: str, indices, maps) -> list[np.ndarray]:
    """``maps`` [n, H, W] outlined over images ``indices`` (the withheld image where one may not be shown)."""
    from ..gradcam import region_overlay

    images = sample_images(ws, split, indices)
    return [region_overlay(image, m) if shown(ws, split, i) else image for i, image, m in zip(indices, images, maps)]


def top_activating(ws, cls: int, filter_index: int, n: int = 6) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
    """The ``n`` training images of class ``cls`` where the filter's pooled activation is largest,
    their region overlays, and captions (``"true 3 · pred 3"``)."""
    train = extraction(ws, "train")
    candidates = np.flatnonzero(train.labels == cls)
    order = candidates[np.argsort(-train.features[candidates, filter_index], kind="stable")[:n]]
    classes = ws.data.classes
    captions = [f"{'✓' if train.preds[i] == train.labels[i] else '✗'} true {classes[train.labels[i]]} · pred {classes[train.preds[i]]}" for i in order]
    return order, filter_regions(ws, "train", order, filter_index), captions


_NINTHS = ("upper left", "top", "upper right", "left", "centre", "right", "lower left", "bottom", "lower right")


def filter_location(ws, cls: int, filter_index: int, n: int = 32) -> dict:
    """Where a filter fires on class ``cls``'s training images (the ``n`` where its pooled
    activation is largest), measured on its activation maps (:func:`cfdebug.gradcam.filter_maps`):
    ``{"where", "peaks", "share", "area"}``. On the embedded digits beds at 32 px the region is the
    demo's corner square (``where="the corner square"``); elsewhere the ninth of the image (3×3
    grid) where the maps peak most often (``"the upper left ninth"``). ``peaks``: the share of the
    images whose strongest response lies in the region; ``share``: the mean share of each map's
    mass there; ``area``: the region's share of the image (what a filter firing evenly would get)."""
    from ..gradcam import filter_maps, region_share

    train = extraction(ws, "train")
    candidates = np.flatnonzero(train.labels == cls)
    order = tuple(int(i) for i in candidates[np.argsort(-train.features[candidates, filter_index], kind="stable")[:n]])

    def compute():
        maps = filter_maps(ws.model, ws.target.name, _batch(ws, "train", order), int(filter_index), ws.device, ws.target.activation)  # [n, H, W]
        n_img, size_h, size_w = maps.shape
        rows, cols = np.unravel_index(maps.reshape(n_img, -1).argmax(1), (size_h, size_w))  # [n] each: the strongest response
        if ws.config.data.source in ("biased-digits", "hard-digits") and size_h == 32:
            from ..data.digits import SQUARE

            region, where = SQUARE, "the corner square"
        else:
            h, w = size_h // 3, size_w // 3
            ninth = np.minimum(rows // h, 2) * 3 + np.minimum(cols // w, 2)
            best = int(np.bincount(ninth, minlength=9).argmax())
            region, where = (slice(best // 3 * h, (best // 3 + 1) * h), slice(best % 3 * w, (best % 3 + 1) * w)), f"the {_NINTHS[best]} ninth"
        inside = (rows >= region[0].start) & (rows < region[0].stop) & (cols >= region[1].start) & (cols < region[1].stop)
        area = (region[0].stop - region[0].start) * (region[1].stop - region[1].start) / float(size_h * size_w)
        return {"where": where, "peaks": float(inside.mean()), "share": float(region_share(maps, *region).mean()), "area": area}

    try:
        return memo(("filter-location", ws_key(ws), int(cls), int(filter_index), order), compute, max_entries=64)
    except CfdebugError as exc:
        show_user_error(exc)


def treatment_predictions(ws) -> dict | None:
    """The newest finished treatment run of this workspace that stored the control's test
    predictions: ``{"run_id", "treated" [N], "control" [N], "base" [N], "lambda1", "lambda2",
    "seed"}`` (int arrays), or ``None``."""
    from .runs import workspace_runs

    for record in workspace_runs(ws, "treat"):
        best = (record.result or {}).get("best_test") or {}
        if record.status == "done" and "control_test_predictions" in best:
            return {"run_id": record.run_id, "treated": np.asarray(best["test_predictions"]), "control": np.asarray(best["control_test_predictions"]),
                    "base": np.asarray(best["base_test_predictions"]), "lambda1": best["lambda1"], "lambda2": best["lambda2"], "seed": best["seed"]}
    return None
