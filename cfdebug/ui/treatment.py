"""The treatment page's helpers: launch a run, its per-epoch curves, read a finished run's results.

The runs themselves are listed and watched like every run (:mod:`cfdebug.ui.runs`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from ..errors import CfdebugError
from .errors import show_error, show_user_error
from .runs import epoch_curves, epoch_rows, seeds_label, start_run


def launch_treatment(ws, lambda1: float, lambda2: float, epochs: int, lr: float, seed: int, n_seeds: int = 1) -> str:
    """Start a treatment run (treatment + its CE-only control, for seeds ``seed … seed + n_seeds − 1``)
    in the background: the same command a user types, ``python -m cfdebug treat --config run.json``."""
    from ..config import TreatmentSchedule
    from ..jobs import treat_spec

    try:
        schedule = TreatmentSchedule(epochs=epochs, lr=lr, seed=seed)
        spec = treat_spec(ws.config, schedule, [lambda1], [lambda2], list(range(seed, seed + max(int(n_seeds), 1))))
    except CfdebugError as exc:
        show_user_error(exc)
    return start_run(ws, "treat", spec)


def treatment_verdict_rows(ws, result: dict) -> list | None:
    """Treated vs control for a finished run's ``result``, paired over seeds and test images
    (:func:`cfdebug.claims.treatment_verdicts`), or ``None`` for a run made before runs kept
    their test predictions."""
    from ..claims import treatment_verdicts

    if not all("test_predictions" in r for r in result["control"] + result["runs"]):
        return None
    return treatment_verdicts(result, list(ws.data.classes), ws.data.splits["test"].labels)


#: A λ-weighted term below this share of the loss cannot move the model (:func:`share_warnings`).
MIN_SHARE = 0.01
#: The weighted terms of a treatment loss, their names for a person, and their weights.
TERMS = {"mc": ("λ1·L_MC", "lambda1"), "non_mc": ("λ2·L_nonMC", "lambda2")}


def percent(share: float) -> str:
    """``"0.002%"``, ``"0.41%"``, ``"12%"``: enough digits to tell a share from zero."""
    if share >= 0.1:
        return f"{share:.0%}"
    if share >= 0.001:
        return f"{100 * share:.2f}%"
    return f"{100 * share:.1g}%"


def delta(difference: float, what: str) -> dict:
    """``st.metric`` keywords for an accuracy difference in points: ``"+0.74 pts vs control"``
    coloured by its sign, and for a difference that rounds to zero ``"±0.00 pts vs control"`` with
    no arrow or colour (no change is neither good nor bad)."""
    points = 100 * difference
    if round(points, 2) == 0:
        return {"delta": f"±0.00 pts {what}", "delta_color": "off", "delta_arrow": "off"}
    return {"delta": f"{points:+.2f} pts {what}"}


def loss_shares(rows) -> list[dict]:
    """Per run part (:func:`part_label`), the latest epoch's share of the loss of each λ-weighted
    term (``share_mc``, ``share_non_mc`` of the engine's history rows): ``[{"part", "epoch",
    "λ1·L_MC", "λ2·L_nonMC", "cross-entropy"}]`` (shares in [0, 1]; a term without its λ: None)."""
    latest: dict[str, dict] = {}
    for row in rows:
        if "share_mc" in row or "share_non_mc" in row:
            part = row.get("part") or part_label(row)
            if part not in latest or row.get("epoch", 0) >= latest[part].get("epoch", 0):
                latest[part] = {**row, "part": part}
    out = []
    for part, row in latest.items():
        shares = {name: (row.get(f"share_{term}") if row.get(weight) else None) for term, (name, weight) in TERMS.items()}
        known = [v for v in shares.values() if v is not None]
        out.append({"part": part, "epoch": row.get("epoch"), **shares, "cross-entropy": 1.0 - sum(known) if known else 1.0})
    return out


def share_warnings(rows) -> list[str]:
    """One line per treated part whose λ-weighted term is under :data:`MIN_SHARE` of the loss (its
    latest epoch): ``"λ2·L_nonMC is 0.002% of the loss (treated λ1=…, seed 0): this setting cannot
    change the model; a larger λ2 would."``"""
    out = []
    for share in loss_shares(rows):
        for term, (name, weight) in TERMS.items():
            value = share.get(name)
            if value is not None and value < MIN_SHARE:
                out.append(f"**{name} is {percent(value)} of the loss** ({share['part']}, epoch {share['epoch']}): this setting "
                           f"cannot change the model; raise {weight.replace('lambda', 'λ')} until the term is a few percent of the loss.")
    return out


def base_batch_terms(ws) -> dict | None:
    """The raw treatment terms on a batch of the base model (λ-free, cached): ``{"ce", "mc",
    "non_mc", "batch_size"}``: the mean cross-entropy and the expected batch sums of
    ``Σ|f⊙G_y|`` and ``Σ|(1−G_y)⊙f|`` (:func:`cfdebug.treatment.treatment_loss`) over the training
    split's cached features and logits with the treatment's global sets (``None`` while the CFE
    heads are not fitted). :func:`share_at` turns them into the share a λ pair gives."""
    from ..config import TreatmentConfig
    from ..jobs import prepared
    from .cache import memo
    from .filters import ws_key

    if not prepared(ws, "filters"):
        return None

    def compute():
        import torch

        from ..treatment import training_sets, treatment_loss

        train = ws.extractions.get("train")
        labels = torch.from_numpy(np.asarray(train.labels, dtype=np.int64))
        sets = torch.from_numpy(training_sets(ws))[labels]  # [N, C] G_y of each image's true class
        terms = treatment_loss(torch.from_numpy(train.logits), labels, torch.from_numpy(train.features), sets, 1.0, 1.0,
                               TreatmentConfig().theta)
        scale = TreatmentConfig().batch_size / len(labels)  # the sums over the split → over one batch
        return {"ce": float(terms["ce"]), "mc": float(terms["mc"]) * scale, "non_mc": float(terms["non_mc"]) * scale,
                "batch_size": TreatmentConfig().batch_size}

    try:
        return memo(("treatment-terms", ws_key(ws)), compute)
    except CfdebugError:
        return None


def share_at(terms: dict, lambda1: float, lambda2: float) -> dict[str, float]:
    """The share of the loss each weighted term would have at ``(lambda1, lambda2)`` on the batch
    of :func:`base_batch_terms` (:func:`cfdebug.training.weighted_terms`' definition: ``|λ·term| /
    (|ce| + Σ|λ·term|)``): ``{"mc", "non_mc"}`` in [0, 1]."""
    weighted = {"mc": abs(lambda1 * terms["mc"]), "non_mc": abs(lambda2 * terms["non_mc"])}
    total = abs(terms["ce"]) + sum(weighted.values())
    return {k: v / max(total, 1e-12) for k, v in weighted.items()}


def part_label(row: dict) -> str:
    """``"control · seed 0"`` or ``"treated λ1=0.001 λ2=2e-05 · seed 0"`` from an epoch row (its
    tag's ``lambda1``, ``lambda2``, ``seed``, as the engine logs them) or a run summary."""
    seed = row.get("seed", "?")
    if not row.get("lambda1") and not row.get("lambda2"):
        return f"control · seed {seed}"
    return f"treated λ1={row['lambda1']:g} λ2={row['lambda2']:g} · seed {seed}"


def live_rows(progress) -> list[dict]:
    """A running treatment's epoch rows so far, each with its ``part`` (:func:`part_label`: control
    or treated λ pair, seed), the same rows and labels as a finished run's :func:`history_rows`."""
    return epoch_rows(progress, part_label)


def show_shares(rows, key: str) -> None:
    """The share of the loss of each λ-weighted term per run part (:func:`loss_shares`), with a
    warning for each term too small to change the model (:func:`share_warnings`)."""
    import pandas as pd

    for line in share_warnings(rows):
        st.warning(line, icon=":material/warning:")
    shares = [r for r in loss_shares(rows) if not r["part"].startswith("control")]
    if shares:
        table = pd.DataFrame(shares)
        config = {c: st.column_config.NumberColumn(format="percent") for c in ("λ1·L_MC", "λ2·L_nonMC", "cross-entropy")}
        st.dataframe(table, hide_index=True, width="stretch", column_config=config, key=key)
        st.caption("Each term's share of the loss in the part's latest epoch (|λ·term| over |CE| + Σ|λ·term|, as the run logs it). "
                   f"A term under {MIN_SHARE:.0%} of the loss cannot move the model: the run is then its control again.")


def live_curves(record, progress) -> None:
    """The running treatment's per-epoch loss terms and validation accuracy so far, one series per
    part as in a finished run, and the loss shares with their warnings (the
    :func:`~cfdebug.ui.runs.run_monitor` extras of the treatment page)."""
    rows = live_rows(progress)
    epoch_curves(record, rows, "per-epoch loss terms and validation accuracy")
    if rows:
        show_shares(rows, key=f"shares-{record.run_id}")


def treated_weights(record) -> Path | None:
    """The weights of the run's best treated model (best λ pair on validation, first seed),
    the same model the run's flagged-set churn was computed on; None if it is not there."""
    from ..treatment import sweep_run_dir

    best, seeds = (record.result or {}).get("best"), record.config.get("seeds") or [0]
    if not best:
        return None
    path = sweep_run_dir(record.run_dir, "treatment", best["lambda1"], best["lambda2"], seeds[0]) / "model.pt"
    return path if path.is_file() else None


def best_model_changes(record) -> dict | None:
    """The best treated model's test predictions against the base model's, as the run stored
    them (:func:`cfdebug.jobs.prediction_changes`: ``confusion_delta``, ``fixed``, ``broken``,
    ``test_predictions``, ``base_test_predictions``, ``labels``).

    A run made by an older version of cfdebug has none: that is shown in the error box (the rest
    of the page still draws) and ``None`` is returned; nothing is re-predicted.
    """
    changes = (record.result or {}).get("best_test")
    if changes and "test_predictions" in changes:
        return changes
    show_error(
        f"Expected run {record.run_id} to hold the treated model's per-image test predictions, but it was made by an "
        "older version of cfdebug that did not store them; launch the run again to see the churn and the confusion delta."
    )
    return None


def grid_labels(spec: dict) -> dict[str, str]:
    """The swept values of a treat spec (:func:`cfdebug.jobs.treat_spec`) for the runs table:
    ``{"λ1", "λ2", "seeds"}``, the weights comma-separated (``"0.001, 0.1"``; the grids are the
    spec's one source of the loss weights), the seeds with their count (``"seed 0"``, ``"3 seeds:
    0, 1, 2"``)."""
    return {"λ1": ", ".join(f"{v:g}" for v in spec.get("lambdas1", [])), "λ2": ", ".join(f"{v:g}" for v in spec.get("lambdas2", [])),
            "seeds": seeds_label(spec.get("seeds"))}


def run_row(record, progress=None) -> dict:
    """One row of the runs table: what the run is and where it stands, with no empty cell: a
    running run's progress and latest validation accuracy, a finished run's treated and control
    test accuracy, a failed one's error (a dash where a value does not apply)."""
    spec = record.config or {}
    row = {"run": record.run_id, "status": record.status, **grid_labels(spec), "epochs": str((spec.get("treatment") or {}).get("epochs", "—"))}
    result = record.result or {}
    if record.active:
        last = progress.epochs[-1] if progress is not None and progress.epochs else {}
        row["progress"] = "running (the bar above)" if record.status == "running" else "queued"
        row["latest val acc."] = f"{last['val_acc']:.1%} ({part_label(last)}, epoch {last['epoch']})" if last.get("val_acc") is not None else "—"
    elif result.get("table2"):
        best = result.get("best") or {}
        t2 = {r["model"]: r for r in result["table2"] if r["model"] != "treatment"}
        treated = next((r for r in result["table2"] if r["model"] == "treatment" and (r["lambda1"], r["lambda2"]) == (best.get("lambda1"), best.get("lambda2"))), None)
        row["progress"] = "done"
        row["test acc. treated / control"] = (f"{treated['test_acc_mean']:.1%} / {t2['fine-tuned']['test_acc_mean']:.1%}"
                                             if treated and "fine-tuned" in t2 else "—")
    else:
        row["progress"] = "—" if not record.error else "stopped"
    if record.error:
        row["error"] = record.error if len(record.error) < 140 else record.error[:137] + "…"
    return row


def flagged_set_change(ws, record, rule) -> dict | None:
    """The flagged-set churn of the run's best treated model (:func:`cfdebug.treatment.flagged_churn`)
    under the flag rule the user chose (:func:`cfdebug.ui.browser.chosen_flag_rule`), not the
    rule the run stored: detection on the base and on the treated model (both cached by the run),
    each flagged by ``rule``. ``None`` when the treated model's detection is not cached."""
    from dataclasses import replace

    from ..detect import CACHE_KIND, report_key, run_detection
    from ..treatment import flagged_churn
    from ..workspace import Workspace
    from .browser import flags_by_rule
    from .cache import memo
    from .filters import ws_key

    churn = (record.result or {}).get("flagged_churn") or {}
    weights = churn.get("weights")
    if not weights:
        return None

    def compute():
        cfg = ws.config
        treated = Workspace(replace(cfg, model=replace(cfg.model, weights=weights)), cached_only=True)
        if not treated.store.exists(CACHE_KIND, report_key(treated)):
            return None
        before, after = run_detection(ws), run_detection(treated)
        flag = lambda report: {**report, "images": [dict(r, flagged=bool(f)) for r, f in zip(report["images"], flags_by_rule(report, rule))]}  # noqa: E731
        return flagged_churn(flag(before), flag(after))

    try:
        return memo(("flagged-churn", ws_key(ws), record.run_id, rule), compute)
    except CfdebugError:
        return None


def history_rows(result: dict) -> list[dict]:
    """A finished run's per-epoch rows (control and every treated run), each with ``part``."""
    return [{**h, "part": part_label(run)} for run in list(result.get("control", [])) + list(result.get("runs", [])) for h in run.get("history", [])]


def prediction_comparison(changes: dict, num_classes: int) -> dict | None:
    """Per-image comparison of the treated model with its control (same seed) and of the control
    with the base model, from a run's ``best_test``: ``{"labels", "base", "control", "treated"}``
    [N] int, ``"treated_vs_control"`` and ``"control_vs_base"`` (each ``{"confusion_delta" [K, K],
    "fixed", "broken"}``: wrong → right and right → wrong indices). ``None`` for a run stored
    before the control's predictions were kept."""
    from ..metrics import prediction_churn

    if "control_test_predictions" not in changes:
        return None
    labels, base = np.asarray(changes["labels"]), np.asarray(changes["base_test_predictions"])
    control, treated = np.asarray(changes["control_test_predictions"]), np.asarray(changes["test_predictions"])
    return {"labels": labels, "base": base, "control": control, "treated": treated,
            "treated_vs_control": prediction_churn(control, treated, labels, num_classes),
            "control_vs_base": prediction_churn(base, control, labels, num_classes)}


def recall_table(classes, base, control, treated):
    """Per-class test recall of base, control and treated (means over seeds) with the two
    differences, sorted by treated − control (the treatment's own effect), largest first."""
    import pandas as pd

    table = pd.DataFrame({"class": list(classes), "base": base, "control": control, "treated": treated})
    table["control − base"] = table["control"] - table["base"]
    table["treated − control"] = table["treated"] - table["control"]
    return table.sort_values("treated − control", ascending=False, kind="stable").reset_index(drop=True)
