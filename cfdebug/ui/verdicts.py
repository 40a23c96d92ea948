"""Verdict cards: a method against its baseline, the paired difference, its 95% interval, the verdict."""

from __future__ import annotations


import pandas as pd
import streamlit as st

from ..errors import CfdebugError
from ..store import stable_hash
from ..verdicts import format_detectable, format_value, verdict_text
from .errors import show_error, show_user_error
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
    """The rows as a table narrow enough for the page: the comparison, both values, the difference
    with its interval, the verdict, what it could detect, what it is paired over (strings, so
    ±inf shows as n/a). :func:`verdict_csv` keeps every number for the download."""
    out = []
    for row in rows:
        r = row if isinstance(row, dict) else row.as_dict()
        out.append({
            "comparison": f"{_name(r['metric'])}: {_name(r['method'])} vs {_name(r['baseline'])}",
            "values": f"{format_value(r['method_value'])} vs {format_value(r['baseline_value'])}",
            "difference [95% CI]": f"{format_value(r['difference'], signed=True)} [{format_value(r['ci_low'], signed=True)}, "
                                   f"{format_value(r['ci_high'], signed=True)}]",
            "verdict": r["verdict"], "could detect": format_detectable(r).removeprefix("could detect "),
            "paired over": f"{r['n_seeds']} seed{'s' if r['n_seeds'] != 1 else ''}" + (f" × {r['n_images']} images" if r.get("n_images") else ""),
            "note": r.get("note") or "",
        })
    return pd.DataFrame(out)


def verdict_csv(rows) -> pd.DataFrame:
    """Every field of the rows, numbers as numbers (the CSV download)."""
    return pd.DataFrame([r if isinstance(r, dict) else r.as_dict() for r in rows])


def show(rows, *, headline: int = 0, title: str | None = None, key: str = "verdicts", claim: str | None = None) -> None:
    """A verdict card: the headline comparison as a sentence, the others in an expander with a CSV
    download. With ``claim``, the rows are also kept for the Overview (:func:`remember`)."""
    rows = [r if isinstance(r, dict) else r.as_dict() for r in rows]
    if claim is not None:
        remember(claim, rows)
    if not rows:
        return
    box = st.container(border=True)
    if title:
        box.markdown(f"**{title}**")
    box.markdown(sentence(rows[headline]), help=_PAIRING_HELP)
    if len(rows) > 1:
        with box.expander(f"All {len(rows)} comparisons"):
            table = verdict_table(rows)
            for column in ("paired over", "note"):  # a column that says the same on every row goes under the table
                if table[column].nunique() == 1:
                    if table[column].iloc[0]:
                        st.caption(f"{column.capitalize()}: {table[column].iloc[0]} (every row).")
                    table = table.drop(columns=column)
            st.dataframe(table, hide_index=True, width="stretch", column_config={"comparison": st.column_config.TextColumn(width="large")})
            st.download_button("Download verdicts (CSV)", verdict_csv(rows).to_csv(index=False), f"{key}.csv", "text/csv", key=f"{key}-csv")


#: In the workdir: each workspace's latest verdicts, so the Overview's card survives a reload and a restart.
VERDICTS_FOLDER = "verdicts"
#: Session state: the open workspace's key and workdir (set by :func:`open_workspace`, read by :func:`remember`).
OPEN_KEY = "cfdebug_verdicts_workspace"


def open_workspace(ws) -> None:
    """Note which workspace the page shows, so :func:`remember` and :func:`remembered` file its verdicts
    under it (:func:`cfdebug.ui.page.workspace_page` calls this)."""
    st.session_state[OPEN_KEY] = (stable_hash(ws.key_parts), str(ws.config.workdir))


def _verdicts_path():
    from pathlib import Path

    key, workdir = st.session_state.get(OPEN_KEY, (None, None))
    return None if key is None else Path(workdir) / VERDICTS_FOLDER / f"{key}.json"


def detection(ws, budget: float) -> list[dict] | None:
    """Detection verdicts as ``report`` judges them: MC agreement vs MSP over the CFE seeds
    :data:`cfdebug.claims.DEFAULT_SEEDS` (:func:`cfdebug.claims.detection_claim`), at the page's
    review ``budget``, cached and remembered (:func:`remember`).

    The seeds' CFE fits not yet cached are made by a background prepare run whose progress is
    drawn where the card goes; ``None`` is returned meanwhile (and in a read-only dashboard
    without them), so the rest of the page goes on.
    """
    from ..claims import DEFAULT_SEEDS, detection_claim
    from ..jobs import prepared
    from .workspace import await_prepare, inline, read_only

    seeds = tuple(DEFAULT_SEEDS)
    try:
        if not inline() and not prepared(ws, "detect", seeds):
            if read_only():
                st.info(f"The verdict over CFE seeds {', '.join(map(str, seeds))} (as `python -m cfdebug report`) is not computed on "
                        "this dashboard, and a read-only dashboard computes nothing.", icon=":material/lock:")
                return None
            what = f"Fitting the CFE heads of seeds {', '.join(map(str, seeds))} for the verdict (as `python -m cfdebug report`)"
            failure = await_prepare(ws.config, "detect", lambda record: prepared(ws, "detect", seeds), what, stop=False, detect_seeds=seeds)
            if failure is not None:
                show_error(failure)
            return None
        key = ("detection-verdicts", stable_hash(ws.key_parts), seeds, float(budget))
        rows = memo(key, lambda: [c.as_dict() for c in detection_claim(ws, seeds, budget)["comparisons"]])
        remember("detection", rows)
        return rows
    except CfdebugError as exc:
        show_user_error(exc)


def remember(claim: str, rows) -> None:
    """Keep a page's verdicts for the Overview's card: in the session and in the workdir
    (``verdicts/<workspace key>.json``, written atomically), under the open workspace, so a
    reload or a restart shows them."""
    from ..store import jsonable, write_json_atomic

    rows = jsonable([r if isinstance(r, dict) else r.as_dict() for r in rows])
    key = st.session_state.get(OPEN_KEY, (None,))[0]
    st.session_state.setdefault("verdicts", {}).setdefault(key, {})[claim] = rows
    stored = _stored()
    path = _verdicts_path()
    if path is None or stored.get(claim) == rows:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {**stored, claim: rows})
    except (OSError, CfdebugError):
        pass  # a read-only workdir: the session still shows them


def _stored() -> dict:
    import json

    path = _verdicts_path()
    try:
        stored = json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        stored = {}
    return stored if isinstance(stored, dict) else {}


def remembered() -> dict:
    """The open workspace's verdicts, ``{claim: rows}``: those in the workdir, then this session's (newer) ones."""
    key = st.session_state.get(OPEN_KEY, (None,))[0]
    return {**_stored(), **st.session_state.get("verdicts", {}).get(key, {})}
