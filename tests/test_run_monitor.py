"""The dashboard's one run monitor, on a fresh work directory (nothing cached, nothing trained): a
run of every kind shows its progress the same way; the owner gets Cancel and the run's log, a
read-only visitor neither."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from cfdebug.config import DataConfig, ModelConfig, TreatmentSchedule, WorkspaceConfig, XCRConfig
from cfdebug.jobs import prepare_spec, treat_spec, xcr_spec
from cfdebug.runs import RunRegistry

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=[True, False], ids=["read-only", "owner"])
def fresh_home(request, tmp_path, monkeypatch):
    """A dashboard (read-only, or the owner's) on an empty CFDEBUG_HOME whose pages start
    background runs (not inline): ``(home, read_only)``."""
    home = tmp_path / "home"
    monkeypatch.setenv("CFDEBUG_HOME", str(home))
    monkeypatch.delenv("CFDEBUG_DASHBOARD_INLINE", raising=False)
    monkeypatch.delenv("CFDEBUG_ROOTS", raising=False)
    monkeypatch.setenv("CFDEBUG_READ_ONLY", "1" if request.param else "0")
    return home, request.param


def _page_config(home: Path) -> WorkspaceConfig:
    """The workspace a page opens with no parameters in its URL (the demo)."""
    return WorkspaceConfig(model=ModelConfig(name="demo-cnn"), data=DataConfig(source="biased-digits"), device="auto", workdir=str(home))


def _open(page: str) -> AppTest:
    """``page`` on its own (app.py's navigation would run the Overview first)."""
    app = AppTest.from_file(str(ROOT / page), default_timeout=180).run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def _monitored(app: AppTest, run_id: str) -> bool:
    """A progress bar is drawn and names the run (in its text or the caption under it)."""
    texts = [p.proto.text or "" for p in app.get("progress")] + [c.value for c in app.caption]
    return bool(app.get("progress")) and any(run_id in text for text in texts)


@pytest.mark.parametrize("kind, page", [("prepare", "views/overview.py"), ("treat", "views/treatment.py"), ("xcr", "views/calibration.py")])
def test_every_run_kind_has_the_one_monitor_and_only_the_owner_may_cancel(fresh_home, kind, page):
    home, read_only = fresh_home
    cfg = _page_config(home)
    spec = {
        "prepare": lambda: prepare_spec(cfg, "extract"),
        "treat": lambda: treat_spec(cfg, TreatmentSchedule(), [1e-3], [2e-5], [0]),
        "xcr": lambda: xcr_spec(cfg, XCRConfig.demo()),
    }[kind]()
    registry = RunRegistry(home)
    run_id = registry.create(kind, spec).run_id  # queued: what the owner started a moment ago
    app = _open(page)
    assert _monitored(app, run_id), [p.proto.text for p in app.get("progress")]
    labels = [b.label for b in app.button]
    logs = [e for e in app.expander if e.label == "Run log"]
    if read_only:
        assert not any("Cancel" in label for label in labels) and not logs, labels
    else:
        assert "Cancel run" in labels and len(logs) == 1
    assert [r.run_id for r in registry.list()] == [run_id]  # nothing else started: a prepare page joins the run


def test_a_failed_runs_resume_command_names_its_workdir(tmp_path):
    """A run registered from a terminal stores a resume hint without its workdir; the page shows
    the one that resumes it where it lives."""
    from types import SimpleNamespace

    from cfdebug.ui.runs import resume_command, run_failure

    record = SimpleNamespace(run_id="treat-1", kind="treat", status="failed",
                             error="RuntimeError: boom; resume with `python -m cfdebug treat --config /x/run.json --run-id treat-1`")
    text = run_failure(record, workdir=tmp_path / "home")
    assert text == (f"the background run `treat-1` failed: RuntimeError: boom; resume with "
                    f"`python -m cfdebug treat --resume treat-1 --workdir {tmp_path / 'home'}`")
    assert resume_command(record, "/a b") == "python -m cfdebug treat --resume treat-1 --workdir '/a b'"
    assert run_failure(SimpleNamespace(**{**vars(record), "error": "Expected x, but got y."}), workdir="/w").endswith("Expected x, but got y.")


def test_a_train_runs_epochs_are_read_from_its_progress_lines(tmp_path):
    """The Train action's prepare run logs its epochs as the engine's epoch-end lines; the monitor
    draws them as curves while it runs."""
    from cfdebug.runs import progress_row
    from cfdebug.ui.workspace import training_epochs

    registry = RunRegistry(tmp_path)
    run_id = registry.create("prepare", {"key": "k"}).run_id
    for epoch, loss, acc in ((1, 2.3, 0.31), (2, 1.2, 0.62)):
        registry.log_progress(run_id, progress_row(epoch / 2, "load", "Training resnet18: training epoch 1/2: batch 3/9"))
        registry.log_progress(run_id, progress_row(epoch / 2, "load", f"Training resnet18: training epoch {epoch}/2: loss {loss:.4f}, "
                                                   f"train acc 0.500, val acc {acc:.3f}, test acc 0.400"))
    assert training_epochs(tmp_path, run_id) == [
        {"part": "training", "epoch": 1, "loss": 2.3, "train_acc": 0.5, "val_acc": 0.31},
        {"part": "training", "epoch": 2, "loss": 1.2, "train_acc": 0.5, "val_acc": 0.62},
    ]
