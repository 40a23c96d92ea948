"""The treatment page's helpers: launch a run, its per-epoch curves, read a finished run's results.

The runs themselves are listed and watched like every run (:mod:`cfdebug.ui.runs`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from ..errors import CfdebugError
from .errors import show_error, show_user_error
from .runs import start_run


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


def part_label(row: dict) -> str:
    """``"control · seed 0"`` or ``"treated λ1=0.001 λ2=2e-05 · seed 0"`` from an epoch row (its
    tag's ``lambda1``, ``lambda2``, ``seed``, as the engine logs them) or a run summary."""
    seed = row.get("seed", "?")
    if not row.get("lambda1") and not row.get("lambda2"):
        return f"control · seed {seed}"
    return f"treated λ1={row['lambda1']:g} λ2={row['lambda2']:g} · seed {seed}"


def live_curves(record, progress) -> None:
    """The running treatment's per-epoch loss terms and validation accuracy so far (the
    :func:`~cfdebug.ui.runs.run_monitor` extras of the treatment page)."""
    from .. import viz

    if progress.epochs:
        rows = [{**r, "part": part_label(r)} for r in progress.epochs]
        st.plotly_chart(viz.training_curves(rows, f"{record.run_id}: per-epoch loss terms and validation accuracy"), width="stretch",
                        key=f"curves-{record.run_id}")


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
    ``{"λ1", "λ2", "seeds"}``, each comma-separated (``"0.001, 0.1"``); the grids are the spec's
    one source of the loss weights."""
    return {"λ1": ", ".join(f"{v:g}" for v in spec.get("lambdas1", [])), "λ2": ", ".join(f"{v:g}" for v in spec.get("lambdas2", [])),
            "seeds": ", ".join(str(v) for v in spec.get("seeds", []))}


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
