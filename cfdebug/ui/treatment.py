"""Treatment runs for the dashboard: launch in the background, poll, read results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from ..config import config_dict
from ..errors import CfdebugError
from .workspace import show_user_error


def registry(ws):
    from ..runs import RunRegistry

    return RunRegistry(ws.config.workdir)


def launch_treatment(ws, lambda1: float, lambda2: float, epochs: int, lr: float, seed: int, n_seeds: int = 1) -> str:
    """Create a treatment run (treatment + its CE-only control, for seeds ``seed … seed + n_seeds − 1``)
    and start it in the background.

    The run is the same command a user types: ``python -m cfdebug treat --config run.json``.
    """
    from ..config import TreatmentSchedule
    from ..jobs import treat_spec
    from ..runs import start_background_run

    try:
        schedule = TreatmentSchedule(epochs=epochs, lr=lr, seed=seed)
        seeds = list(range(seed, seed + max(int(n_seeds), 1)))
        return start_background_run(ws.config.workdir, "treat", treat_spec(ws.config, schedule, [lambda1], [lambda2], seeds))
    except CfdebugError as exc:
        show_user_error(exc)


def runs_for(ws) -> list:
    """Treatment runs of this workspace's model and data, newest first."""
    mine = config_dict(ws.config)
    return [r for r in registry(ws).list("treat") if r.config.get("workspace", {}).get("model") == mine["model"] and r.config.get("workspace", {}).get("data") == mine["data"]]


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

    A run made by an older version of cfdebug has none: that is shown as ``st.error`` (the rest
    of the page still draws) and ``None`` is returned; nothing is re-predicted.
    """
    changes = (record.result or {}).get("best_test")
    if changes and "test_predictions" in changes:
        return changes
    st.error(
        f"Expected run {record.run_id} to hold the treated model's per-image test predictions, but it was made by an "
        "older version of cfdebug that did not store them; launch the run again to see the churn and the confusion delta.",
        icon=":material/error:",
    )
    return None


def grid_labels(spec: dict) -> dict[str, str]:
    """The swept values of a treat spec (:func:`cfdebug.jobs.treat_spec`) for the runs table:
    ``{"λ1", "λ2", "seeds"}``, each comma-separated (``"0.001, 0.1"``); the grids are the spec's
    one source of the loss weights."""
    return {"λ1": ", ".join(f"{v:g}" for v in spec.get("lambdas1", [])), "λ2": ", ".join(f"{v:g}" for v in spec.get("lambdas2", [])),
            "seeds": ", ".join(str(v) for v in spec.get("seeds", []))}


def part_label(tag: dict | None) -> str:
    """``"control · seed 0"`` or ``"treated λ1=0.001 λ2=2e-05 · seed 0"`` from a progress row's ``tag``."""
    tag = tag or {}
    seed = tag.get("seed", "?")
    if not tag.get("lambda1") and not tag.get("lambda2"):
        return f"control · seed {seed}"
    return f"treated λ1={tag['lambda1']:g} λ2={tag['lambda2']:g} · seed {seed}"


def run_rows(ws, run_id: str) -> list[dict]:
    """The run's per-epoch progress rows, each with ``part`` (:func:`part_label`)."""
    try:
        return [{**r, "part": part_label(r.get("tag"))} for r in registry(ws).progress(run_id) if "epoch" in r]
    except CfdebugError as exc:
        show_user_error(exc)


def history_rows(result: dict) -> list[dict]:
    """A finished run's per-epoch rows (control and every treated run), each with ``part``."""
    out = []
    for run in list(result.get("control", [])) + list(result.get("runs", [])):
        tag = {"lambda1": run["lambda1"], "lambda2": run["lambda2"], "seed": run["seed"]}
        out += [{**h, "part": part_label(tag)} for h in run.get("history", [])]
    return out


def _log_tail(record) -> str:
    try:
        lines = [ln.strip() for ln in record.log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:160] if lines else ""


def run_status(record, rows: list[dict], now: float | None = None) -> dict:
    """Where a running treatment run is: ``{"fraction", "text", "left_s"}``.

    ``left_s`` is measured, not promised: the mean wall time of the epochs done so far (training
    plus validation, from the rows' ``train_seconds``/``eval_seconds``) times the epochs left;
    ``None`` before the first epoch (then ``text`` is the run log's last line: loading the
    workspace, fitting the CFE heads for G_y, …).
    """
    import time

    from ..runs import describe_seconds_left

    spec = record.config or {}
    epochs = max(int(spec.get("treatment", {}).get("epochs", 1)), 1)
    parts = len(spec.get("seeds", [0])) * (1 + len(spec.get("lambdas1", [0])) * len(spec.get("lambdas2", [0])))
    total = parts * epochs
    elapsed = (now or time.time()) - record.created
    if not rows:
        return {"fraction": 0.0, "left_s": None, "elapsed_s": elapsed,
                "text": f"preparing ({elapsed:.0f} s): {_log_tail(record) or 'starting the process'}"}
    last = rows[-1]
    per_epoch = float(np.mean([float(r.get("train_seconds", 0)) + float(r.get("eval_seconds", 0)) for r in rows]))
    left = per_epoch * max(total - len(rows), 0)
    text = (f"{last['part']}, epoch {last['epoch']}/{epochs} (part {min(len(rows) // epochs + (len(rows) % epochs > 0), parts)} of {parts}); "
            f"{len(rows)}/{total} epochs in {elapsed:.0f} s; {describe_seconds_left(left)} at {per_epoch:.1f} s/epoch, "
            "then detection on the treated model")
    return {"fraction": len(rows) / total, "left_s": left, "elapsed_s": elapsed, "text": text}


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
