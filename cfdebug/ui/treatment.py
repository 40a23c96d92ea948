"""Treatment runs for the dashboard: launch in the background, poll, read results."""

from __future__ import annotations

from pathlib import Path

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
    from ..jobs import treat_spec
    from ..runs import start_background_run
    from ..treatment import TreatmentConfig

    try:
        treatment = TreatmentConfig(lambda1=lambda1, lambda2=lambda2, epochs=epochs, lr=lr, seed=seed)
        seeds = list(range(seed, seed + max(int(n_seeds), 1)))
        return start_background_run(ws.config.workdir, "treat", treat_spec(ws.config, treatment, [lambda1], [lambda2], seeds))
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
