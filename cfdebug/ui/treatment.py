"""Treatment runs for the dashboard: launch in the background, poll, read results."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ..config import config_dict
from ..errors import CfdebugError
from .workspace import memo, show_user_error

LAMBDA1_GRID = (0.0, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 0.1)
LAMBDA2_GRID = (0.0, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 1e-3)


def registry(ws):
    from ..runs import RunRegistry

    return RunRegistry(ws.config.workdir)


def launch_treatment(ws, lambda1: float, lambda2: float, epochs: int, lr: float, seed: int) -> str:
    """Create a treatment run (treatment + its CE-only control) and start it in the background.

    The run is the same command a user types: ``python -m cfdebug treat --config run.json``.
    """
    from ..runs import launch
    from ..treatment import TreatmentConfig

    try:
        treatment = TreatmentConfig(lambda1=lambda1, lambda2=lambda2, epochs=epochs, lr=lr, seed=seed)
        reg = registry(ws)
        spec = {"workspace": config_dict(ws.config), "treatment": config_dict(treatment), "lambdas1": [lambda1], "lambdas2": [lambda2], "seeds": [seed]}
        record = reg.create("treat", spec)
        launch(reg, record.run_id, [sys.executable, "-m", "cfdebug", "treat", "--config", str(record.config_path), "--run-id", record.run_id, "--workdir", ws.config.workdir, "--quiet"])
        return record.run_id
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


def test_predictions(ws, weights: Path) -> np.ndarray:
    """Test predictions [N] of the workspace architecture with ``weights`` (for the confusion delta)."""
    from ..models import load_model
    from ..training import predict_logits

    def compute():
        model = load_model(type(ws.config.model)(name=ws.config.model.name, weights=str(weights), layer=ws.config.model.layer), ws.data.num_classes)
        return predict_logits(model.to(ws.device), ws.data, "test", ws.device).argmax(1)

    return memo(("treated-preds", str(weights), weights.stat().st_mtime_ns), compute)
