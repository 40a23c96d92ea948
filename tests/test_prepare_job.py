"""Prepare runs (jobs.run_prepare_job, `python -m cfdebug prepare`), joining a run that makes the
same artifacts (RunRegistry.create_or_join) and the time-left estimate (runs.seconds_left)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cfdebug.config import DataConfig, ModelConfig, TrainConfig, WorkspaceConfig
from cfdebug.errors import CfdebugError
from cfdebug.jobs import PREPARE_STAGES, prepare_key, prepare_spec, prepared, run_prepare_job
from cfdebug.runs import RunRegistry, describe_seconds_left, seconds_left

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def tiny_tree(root: Path, n_train: int = 8, n_test: int = 4) -> Path:
    """An ImageFolder tree (train/ test/) of 16×16 PNGs, one colour per class plus noise."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for cls, colour in COLOURS.items():
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(np.asarray(colour) + rng.normal(0, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def tiny_config(tmp_path: Path, model: str = "demo-cnn", epochs: int = 2) -> WorkspaceConfig:
    return WorkspaceConfig(
        model=ModelConfig(name=model), data=DataConfig(source=str(tiny_tree(tmp_path / "data")), input_size=32, val_fraction=0.25),
        train=TrainConfig(epochs=epochs), device="cpu", workdir=str(tmp_path / "wd"),
    )


# ------------------------------------------------------------------------------------- time left
def test_seconds_left_from_measured_throughput():
    assert seconds_left([(0.0, 0.0), (10.0, 0.25)], now=10.0) == pytest.approx(30.0)
    assert seconds_left([(0.0, 0.0), (10.0, 0.25)], now=14.0) == pytest.approx(26.0)  # time since the last row counts
    assert seconds_left([(0.0, 0.0), (10.0, 0.5)], now=100.0) == 0.0  # late: never negative
    # a drop of the fraction starts a new stage: only its rows count
    assert seconds_left([(0, 0.2), (5, 0.9), (6, 0.1), (16, 0.2)], now=16) == pytest.approx(80.0)


@pytest.mark.parametrize("points", [[], [(0.0, 0.3)], [(5.0, 0.1), (5.0, 0.2)], [(0.0, 0.4), (9.0, 0.4)]])
def test_seconds_left_is_none_until_something_was_measured(points):
    assert seconds_left(points, now=10.0) is None


def test_describe_seconds_left():
    assert describe_seconds_left(None) == ""
    assert describe_seconds_left(3) == "a few seconds left"
    assert describe_seconds_left(41) == "about 40 s left"
    assert describe_seconds_left(600) == "about 10 min left"
    assert describe_seconds_left(3 * 3600) == "about 3.0 h left"


# ----------------------------------------------------------------------------------- dedupe
def test_create_or_join_joins_an_active_run_with_the_same_key(tmp_path):
    registry = RunRegistry(tmp_path)
    first, created = registry.create_or_join("prepare", {"key": "k1", "through": "extract"})
    again, created_again = registry.create_or_join("prepare", {"key": "k1", "through": "detect"})
    other, created_other = registry.create_or_join("prepare", {"key": "k2"})
    assert created and not created_again and created_other
    assert again.run_id == first.run_id and other.run_id != first.run_id
    assert registry.find_active("prepare", "k1").run_id == first.run_id
    registry.set_result(first.run_id, {})
    assert registry.find_active("prepare", "k1") is None
    fresh, created = registry.create_or_join("prepare", {"key": "k1"})
    assert created and fresh.run_id != first.run_id
    with pytest.raises(CfdebugError, match="`key`"):
        registry.create_or_join("prepare", {"through": "extract"})


def test_a_stale_queued_run_is_not_joined(tmp_path, monkeypatch):
    import cfdebug.runs.registry as registry_module

    registry = RunRegistry(tmp_path)
    stale, _ = registry.create_or_join("prepare", {"key": "k"})
    monkeypatch.setattr(registry_module, "STALE_LAUNCH_S", -1.0)  # its launcher died before launching it
    fresh, created = registry.create_or_join("prepare", {"key": "k"})
    assert created and fresh.run_id != stale.run_id


def test_racing_sessions_get_one_run(tmp_path):
    registry = RunRegistry(tmp_path)
    ids, barrier = [], threading.Barrier(6)

    def ask():
        barrier.wait()
        ids.append(registry.create_or_join("prepare", {"key": "same"})[0].run_id)

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 6 and len(set(ids)) == 1
    assert len(registry.list("prepare")) == 1


# ----------------------------------------------------------------------------------- specs
def test_prepare_spec_and_key():
    ws = WorkspaceConfig(workdir="/tmp/x")
    spec = prepare_spec(ws, "filters")
    assert spec["through"] == "filters" and spec["train"] is False and spec["key"] == prepare_key(ws)
    assert prepare_spec(ws, "detect")["key"] == spec["key"]  # one run per workspace, whatever its stage
    assert prepare_spec(ws, "load", train=True)["key"] != spec["key"]
    with pytest.raises(CfdebugError, match="through"):
        prepare_spec(ws, "everything")
    with pytest.raises(CfdebugError, match="training run"):
        prepare_spec(ws, "extract", train=True)
    with pytest.raises(CfdebugError, match="`workspace`"):
        run_prepare_job({"through": "extract"})


# ----------------------------------------------------------------------------------- the job
def test_prepare_run_trains_extracts_and_detects_with_progress_rows(tmp_path):
    from cfdebug.workspace import ModelNotTrained, Workspace

    cfg = tiny_config(tmp_path)
    with pytest.raises(ModelNotTrained):
        Workspace(cfg, cached_only=True)
    registry = RunRegistry(cfg.workdir)
    spec = prepare_spec(cfg, "detect")
    run_id = registry.create("prepare", spec).run_id
    seen = []
    result = run_prepare_job(spec, run_id=run_id, progress=lambda f, m: seen.append((f, m)))
    record = registry.get(run_id)
    assert record.status == "done" and record.result == result
    assert result["through"] == "detect" and result["random_weights"] is False and "weights" not in result
    rows = [row for _, row in registry.timed_progress(run_id)]
    assert [r["stage"] for r in rows][0] == "load" and rows[-1]["stage"] == "detect"
    assert {r["stage"] for r in rows} == set(PREPARE_STAGES)
    assert all(0.0 <= r["fraction"] <= 1.0 and r["steps"] == 4 for r in rows)
    assert [r["fraction"] for r in rows] == sorted(r["fraction"] for r in rows)
    assert any("training epoch 2/2" in r["message"] for r in rows)  # a stage's last row is always logged
    assert {(r["fraction"], r["message"]) for r in rows} <= set(seen)  # the caller's callback gets every report, the registry at most every PROGRESS_EVERY_S
    ws = Workspace(cfg, cached_only=True)  # the trained model is cached now
    assert ws.model_digest == result["model_digest"]
    assert all(prepared(ws, stage) for stage in PREPARE_STAGES)


def test_cancelling_a_prepare_run_stops_the_cfe_fit_between_batches(tmp_path):
    """The run's cancel flag reaches the CFE heads' fit (jobs._prepare → cfe.mc_heads, and
    detect.run_detection → cfe.mc_heads): it stops after the batch it is in, nothing is cached."""
    from cfdebug.cfe import heads_key
    from cfdebug.cfe.cache import CACHE_KIND as CFE_KIND
    from cfdebug.config import CFEConfig
    from cfdebug.detect import run_detection
    from cfdebug.runs import RunCancelled
    from cfdebug.workspace import Workspace

    cfg = tiny_config(tmp_path)
    registry = RunRegistry(cfg.workdir)
    spec = prepare_spec(cfg, "detect")
    run_id = registry.create("prepare", spec).run_id
    fit_messages = []

    def progress(fraction: float, message: str) -> None:
        if message.startswith("Fitting CFE heads: ") and "epoch" in message:
            fit_messages.append(message)
            registry.request_cancel(run_id)  # as the dashboard's Cancel does, after the fit's first epoch

    assert run_prepare_job(spec, run_id=run_id, progress=progress) is None
    record = registry.get(run_id)
    assert record.status == "cancelled"
    epochs = CFEConfig().epochs
    assert len(fit_messages) == 1 and f"epoch 1/{epochs}" in fit_messages[0]  # no epoch after the cancel
    ws = Workspace(cfg, cached_only=True)
    assert not ws.store.exists(CFE_KIND, heads_key(ws, "mc", CFEConfig()))
    assert {row["stage"] for row in registry.progress(run_id)} == {"load", "extract", "filters"}  # detect never started

    polls = []
    with pytest.raises(RunCancelled):
        run_detection(ws, should_stop=lambda: polls.append(1) or len(polls) > 2)
    assert len(polls) == 3  # polled before each batch; the third poll stopped it
    assert not ws.store.exists(CFE_KIND, heads_key(ws, "mc", CFEConfig()))


def test_prepare_run_of_a_missing_folder_fails_with_the_users_message(tmp_path):
    cfg = WorkspaceConfig(data=DataConfig(source=str(tmp_path / "missing")), workdir=str(tmp_path / "wd"))
    registry = RunRegistry(cfg.workdir)
    spec = prepare_spec(cfg)
    run_id = registry.create("prepare", spec).run_id
    with pytest.raises(CfdebugError, match="does not exist"):
        run_prepare_job(spec, run_id=run_id)
    record = registry.get(run_id)
    assert record.status == "failed" and "does not exist" in record.error and "resume" not in record.error


@pytest.mark.slow
def test_training_run_of_a_random_torchvision_model_through_the_cli(tmp_path, capsys):
    from cfdebug.cli import main
    from cfdebug.workspace import Workspace

    cfg = tiny_config(tmp_path, model="resnet18", epochs=1)
    random_ws = Workspace(cfg)
    assert random_ws.random_weights and not random_ws.trained_weights_path().is_file()
    argv = ["prepare", "--train", "--model", "resnet18", "--data", cfg.data.source, "--input-size", "32",
            "--val-fraction", "0.25", "--epochs", "1", "--device", "cpu", "--workdir", cfg.workdir, "--quiet"]
    assert main(argv) == 0
    assert "trained weights:" in capsys.readouterr().out
    assert random_ws.trained_weights_path().is_file()
    trained = Workspace(WorkspaceConfig(model=ModelConfig("resnet18", weights=str(random_ws.trained_weights_path())), data=cfg.data,
                                        train=cfg.train, device="cpu", workdir=cfg.workdir))
    assert not trained.random_weights


def test_key_functions_name_the_keys_the_stages_store_under(demo_workspace):
    from cfdebug.detect import CACHE_KIND as DETECT_KIND, report_key, run_detection
    from cfdebug.mcfilters import CACHE_KIND as FILTERS_KIND, filters_key, global_mc_filters

    global_mc_filters(demo_workspace)
    run_detection(demo_workspace)
    assert demo_workspace.store.exists(FILTERS_KIND, filters_key(demo_workspace))
    assert demo_workspace.store.exists(DETECT_KIND, report_key(demo_workspace))
    for split in ("train", "val", "test"):
        demo_workspace.extractions.get(split)
    assert prepared(demo_workspace, "detect")
