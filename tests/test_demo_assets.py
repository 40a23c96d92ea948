"""The shipped demo models (assets/models/), their use by the workspace, and reproducible training."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cfdebug.workspace as workspace_module
from cfdebug.config import DEMO_DATASETS, DataConfig, TrainConfig, WorkspaceConfig
from cfdebug.errors import CfdebugError
from cfdebug.models import DEMO_MODEL, DemoCNN, read_state_dict
from cfdebug.runtime import fixed_threads
from cfdebug.training import predict_logits
from cfdebug.workspace import DEMO_THREADS, Workspace, demo_asset_paths, pixels_sha256

ROOT = Path(__file__).resolve().parents[1]


class StopTraining(Exception):
    """Raised from a progress callback: training started (and is cut short after one epoch)."""


def _stop(fraction: float, message: str) -> None:
    raise StopTraining(message)


def _record(bed: str) -> dict:
    return json.loads(demo_asset_paths(bed)[1].read_text())


@pytest.mark.parametrize("bed", DEMO_DATASETS)
def test_asset_is_small_and_its_record_is_complete(bed):
    weights, record_path = demo_asset_paths(bed)
    assert weights.parent == ROOT / "assets" / "models"
    assert weights.stat().st_size < 512 * 1024  # well under 1 MB
    record = _record(bed)
    assert record["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert record["model"] == DEMO_MODEL and record["data"] == bed and record["threads"] == DEMO_THREADS
    for field in ("command", "seed", "torch", "data_fingerprint", "pixels_sha256", "train_config", "history"):
        assert field in record, field
    assert set(record["accuracy"]) == {"train", "val", "test"}
    DemoCNN(10).load_state_dict(read_state_dict(weights))


@pytest.mark.parametrize("bed", DEMO_DATASETS)
def test_demo_workspace_loads_the_asset_without_training(bed, tmp_path):
    ws = Workspace(WorkspaceConfig(data=DataConfig(source=bed), workdir=str(tmp_path), device="cpu"), _stop)
    record = _record(bed)
    assert ws.model_meta["source"] == "asset" and ws.model_meta["accuracy"] == record["accuracy"]
    assert ws.model_digest == record["sha256"][:20]
    assert not (tmp_path / "objects" / "models").exists()  # nothing trained, nothing cached
    assert record["data_fingerprint"] == ws.data.fingerprint
    assert record["pixels_sha256"] == pixels_sha256(ws.data)  # the same pixels as where it was made
    # a cheap forward pass gives exactly the stated accuracies (on the threads it was evaluated on)
    with fixed_threads(DEMO_THREADS):
        for split, stated in record["accuracy"].items():
            predicted = predict_logits(ws.model, ws.data, split, ws.device).argmax(1)
            assert float((predicted == ws.data.splits[split].labels).mean()) == stated, split


def test_hard_digits_asset_is_hard_but_not_hopeless():
    record = _record("hard-digits")
    acc = record["accuracy"]
    assert 0.80 <= acc["test"] <= 0.92  # errors for ordinary reasons, not saturated
    assert record["train_config"]["epochs"] == 20  # the bed's default (BED_TRAIN_EPOCHS)
    biased, clean = _record("biased-digits")["accuracy"], _record("clean-digits")["accuracy"]
    assert biased["test"] < clean["test"] - 0.05  # the shortcut costs test accuracy


@pytest.mark.slow
def test_train_request_and_other_configs_do_not_use_the_asset(tmp_path):
    """``train=True`` trains fresh; a training config the asset was not made with trains too."""
    config = WorkspaceConfig(workdir=str(tmp_path), device="cpu")
    with pytest.raises(StopTraining):
        Workspace(config, _stop, train=True)
    other = WorkspaceConfig(train=TrainConfig(epochs=1), workdir=str(tmp_path), device="cpu")
    with pytest.raises(StopTraining):
        Workspace(other, _stop)


def test_damaged_asset_warns_and_trains(tmp_path, monkeypatch):
    assets = tmp_path / "assets"
    shutil.copytree(demo_asset_paths("biased-digits")[0].parent, assets)
    weights = demo_asset_paths("biased-digits", assets)[0]
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    monkeypatch.setattr(workspace_module, "ASSET_DIR", assets)
    with pytest.warns(UserWarning, match="sha256"), pytest.raises(StopTraining):
        Workspace(WorkspaceConfig(workdir=str(tmp_path / "wd"), device="cpu"), _stop)


def test_demo_training_key_names_the_thread_count(tmp_path, monkeypatch):
    ws = Workspace(WorkspaceConfig(workdir=str(tmp_path), device="cpu"))
    key = ws.trained_model_key()
    monkeypatch.setattr(workspace_module, "DEMO_THREADS", DEMO_THREADS + 1)
    assert ws.trained_model_key() != key


def test_fixed_threads_restores_settings():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with pytest.raises(RuntimeError, match="inside"):
        with fixed_threads(1):
            assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
            raise RuntimeError("inside")
    assert torch.get_num_threads() == threads and torch.are_deterministic_algorithms_enabled() == deterministic
    with fixed_threads(1, deterministic=False):
        assert torch.are_deterministic_algorithms_enabled() == deterministic
    with pytest.raises(CfdebugError, match="threads"):
        with fixed_threads(0):
            pass


TRAIN_CHILD = """
import sys, torch
from cfdebug.config import DataConfig, TrainConfig, WorkspaceConfig
from cfdebug.workspace import Workspace
ws = Workspace(WorkspaceConfig(data=DataConfig(source="hard-digits"), train=TrainConfig(epochs=2), workdir=sys.argv[1], device="cpu"), train=True)
torch.save({"state": ws.model.state_dict(), "accuracy": ws.model_meta["accuracy"]}, sys.argv[2])
"""


@pytest.mark.slow
def test_demo_training_is_independent_of_the_thread_count(tmp_path):
    """Two processes started with 1 and 2 OpenMP threads train the same weights, bit for bit."""
    results = []
    for n in (1, 2):
        env = dict(os.environ, OMP_NUM_THREADS=str(n), PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        out = tmp_path / f"threads{n}.pt"
        subprocess.run([sys.executable, "-c", TRAIN_CHILD, str(tmp_path / f"wd{n}"), str(out)], env=env, check=True, cwd=ROOT)
        results.append(torch.load(out, weights_only=True))
    (a, b) = results
    assert a["accuracy"] == b["accuracy"]
    assert a["state"].keys() == b["state"].keys()
    for name in a["state"]:
        assert torch.equal(a["state"][name], b["state"][name]), name
    assert np.isfinite(a["accuracy"]["val"])


def test_dashboard_sidebar_offers_hard_digits_with_its_asset(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CFDEBUG_HOME", str(tmp_path))
    app = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)
    app.run()
    assert "hard-digits" in app.sidebar.selectbox[0].options
    app.sidebar.selectbox[0].set_value("hard-digits")
    app.sidebar.button[0].click().run()
    assert not app.exception, [e.value for e in app.exception]
    assert not app.error, [e.value for e in app.error]
    assert app.metric[2].value == f"{100 * _record('hard-digits')['accuracy']['test']:.1f}%"  # Test accuracy
    assert not (tmp_path / "objects" / "models").exists()  # the shipped model, not a trained one
