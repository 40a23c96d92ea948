"""Verdict cards: a method against its baseline, the paired difference, its 95% interval, the verdict."""

from __future__ import annotations


import pandas as pd
import streamlit as st

from ..errors import CfdebugError
from ..store import stable_hash
from ..verdicts import format_detectable, format_value, verdict_text
from .errors import show_user_error
from .cache import memo

_ICONS = {"better": "✅", "worse": "⚠️", "no detectable difference": "≈"}
_PAIRING_HELP = (
    "The interval is a 95% bootstrap interval of the paired difference: the test images (and, for retraining runs, the "
    "seeds) are resampled, both arms on the same draw. **better**/**worse**: the interval excludes 0 on the side the "
    "metric favours; otherwise **no detectable difference**, with the smallest difference this comparison could have "
    "detected. A zero-width interval means both arms predicted every image alike. `python -m cfdebug report` runs "
    "every claim over 3 seeds."
)


# Plain names for the identifiers in verdict rows.
NAMES = {
    "mc_agreement": "MC agreement", "mc_recall": "MC recall", "mc_f1": "MC F1", "combined": "combined rank",
    "msp": "max softmax (MSP)", "auroc": "AUROC", "aupr_err": "AUPR-Err", "fpr_at_95tpr": "FPR at 95% TPR",
    "precision_at_budget": "precision at the review budget", "test_acc": "test accuracy", "clean_acc": "clean accuracy",
    "corrupt_acc": "corrupted accuracy", "clean_ece": "clean ECE", "corrupt_ece": "corrupted ECE", "clean_nll": "clean NLL",
    "corrupt_nll": "corrupted NLL", "clean_brier": "clean Brier", "corrupt_brier": "corrupted Brier",
    "cam_in_region": "Grad-CAM share in the region", "wrong_region_acc": "accuracy with a wrong class's region",
    "flagged_still_wrong": "flagged predictions still wrong",
}


def _name(x: str) -> str:
    return NAMES.get(x, x)


def sentence(row: dict) -> str:
    """``"AUROC: MC agreement 0.858 vs MSP 0.892, −0.033 [−0.077, +0.010]: no detectable difference"``."""
    r = row if isinstance(row, dict) else row.as_dict()
    paired = f"{r['n_seeds']} seed{'s' if r['n_seeds'] != 1 else ''}" + (f" × {r['n_images']} test images" if r.get("n_images") else "")
    words = verdict_text(r)[len(r["verdict"]):].strip(" ()")
    tail = f" (paired over {paired}" + (f"; {words})" if words else ")")
    return (f"{_ICONS.get(r['verdict'], '')} **{_name(r['metric'])}**: {_name(r['method'])} {r['method_value']:.3f} vs {_name(r['baseline'])} "
            f"{r['baseline_value']:.3f}, difference {r['difference']:+.3f} [{format_value(r['ci_low'], signed=True)}, {format_value(r['ci_high'], signed=True)}] "
            f"→ **{r['verdict']}**{tail}")


def verdict_table(rows) -> pd.DataFrame:
    """The rows as a table (strings for the interval bounds, so ±inf shows as n/a)."""
    out = []
    for row in rows:
        r = row if isinstance(row, dict) else row.as_dict()
        out.append({"metric": _name(r["metric"]), "method": _name(r["method"]), "baseline": _name(r["baseline"]), "method value": r["method_value"],
                    "baseline value": r["baseline_value"], "difference": r["difference"], "95% CI low": format_value(r["ci_low"], signed=True),
                    "95% CI high": format_value(r["ci_high"], signed=True), "paired over": f"{r['n_seeds']} seed(s)" + (f", {r['n_images']} images" if r.get("n_images") else ""),
                    "verdict": r["verdict"], "could detect": format_detectable(r).removeprefix("could detect "), "note": r.get("note") or ""})
    return pd.DataFrame(out)


def show(rows, *, headline: int = 0, title: str | None = None, key: str = "verdicts") -> None:
    """A verdict card: the headline comparison as a sentence, the others in an expander with a CSV download."""
    rows = [r if isinstance(r, dict) else r.as_dict() for r in rows]
    if not rows:
        return
    box = st.container(border=True)
    if title:
        box.markdown(f"**{title}**")
    box.markdown(sentence(rows[headline]), help=_PAIRING_HELP)
    if len(rows) > 1:
        with box.expander(f"All {len(rows)} comparisons"):
            table = verdict_table(rows)
            st.dataframe(table, hide_index=True, width="stretch")
            st.download_button("Download verdicts (CSV)", table.to_csv(index=False), f"{key}.csv", "text/csv", key=f"{key}-csv")


def detection(ws, report: dict, budget: float) -> list[dict]:
    """Detection verdicts for the page's report (one CFE seed, bootstrap over its test images), cached."""
    from ..claims import detection_verdicts

    key = ("detection-verdicts", stable_hash(ws.key_parts), stable_hash(report.get("config")), float(budget))
    try:
        rows = memo(key, lambda: [c.as_dict() for c in detection_verdicts([report], budget)])
        st.session_state.setdefault("verdicts", {})["detection"] = rows
        return rows
    except CfdebugError as exc:
        show_user_error(exc)


def remember(claim: str, rows) -> None:
    """Keep a page's verdicts for the Overview's card (this browser session)."""
    st.session_state.setdefault("verdicts", {})[claim] = [r if isinstance(r, dict) else r.as_dict() for r in rows]


def remembered() -> dict:
    return dict(st.session_state.get("verdicts", {}))
