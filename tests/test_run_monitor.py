"""The dashboard's one run monitor, seen by a read-only visitor: a run of every kind shows its
progress, and no Cancel button, on a fresh work directory (nothing cached, nothing trained)."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from cfdebug.config import DataConfig, ModelConfig, TreatmentConfig, WorkspaceConfig, XCRConfig
from cfdebug.jobs import prepare_spec, treat_spec, xcr_spec
from cfdebug.runs import RunRegistry

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_home(tmp_path, monkeypatch):
    """A read-only dashboard on an empty CFDEBUG_HOME whose pages start background runs (not inline)."""
    home = tmp_path / "home"
    monkeypatch.setenv("CFDEBUG_HOME", str(home))
    monkeypatch.delenv("CFDEBUG_DASHBOARD_INLINE", raising=False)
    monkeypatch.delenv("CFDEBUG_ROOTS", raising=False)
    monkeypatch.setenv("CFDEBUG_READ_ONLY", "1")
    return home


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
def test_a_read_only_visitor_sees_a_runs_progress_but_no_cancel(fresh_home, kind, page):
    cfg = _page_config(fresh_home)
    spec = {
        "prepare": lambda: prepare_spec(cfg, "extract"),
        "treat": lambda: treat_spec(cfg, TreatmentConfig(), [1e-3], [2e-5], [0]),
        "xcr": lambda: xcr_spec(cfg, XCRConfig.demo()),
    }[kind]()
    registry = RunRegistry(fresh_home)
    run_id = registry.create(kind, spec).run_id  # queued: what the owner started a moment ago
    app = _open(page)
    assert _monitored(app, run_id), [p.proto.text for p in app.get("progress")]
    labels = [b.label for b in app.button]
    assert not any("Cancel" in label for label in labels), labels
    assert [r.run_id for r in registry.list()] == [run_id]  # the visitor started nothing
