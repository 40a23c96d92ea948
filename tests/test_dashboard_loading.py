"""The dashboard's loading: background prepare runs with progress (shared by sessions, picked up
when done), the sidebar's preprocessing fields, the random-weights warning and its Train action,
and errors in the sidebar's terms with a fall-back to the previous workspace."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from cfdebug.runs import RunRegistry, read_progress
from cfdebug.ui.errors import widget_terms
from cfdebug.ui.workspace import INLINE_ENV
from test_prepare_job import tiny_tree

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")
# A hang guard only (the runs take seconds): a broken child would otherwise block the suite.
RUN_GUARD_S = 600


def _value(param):
    return param[0] if isinstance(param, list) else param


def _ok(app):
    assert not app.exception, [e.value for e in app.exception]


def _wait_for_runs(registry: RunRegistry) -> None:
    deadline = time.monotonic() + RUN_GUARD_S
    while any(not r.finished for r in registry.list()):
        assert time.monotonic() < deadline, [(r.run_id, r.status, r.log_path.read_text()[-2000:]) for r in registry.list()]
        time.sleep(0.5)
    failed = [(r.run_id, r.error, r.log_path.read_text()[-2000:]) for r in registry.list() if r.status != "done"]
    assert not failed, failed


@pytest.fixture(autouse=True)
def _tmp_is_an_allowed_root(tmp_path, monkeypatch):
    """The folders these tests open live under tmp_path: let the dashboard read them (allowed roots)."""
    monkeypatch.setenv("CFDEBUG_ROOTS", str(tmp_path))
    monkeypatch.delenv("CFDEBUG_READ_ONLY", raising=False)


@pytest.fixture
def background(tmp_path, monkeypatch):
    """A fresh CFDEBUG_HOME with pages that start background runs (not inline); returns its registry."""
    monkeypatch.delenv(INLINE_ENV, raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("CFDEBUG_HOME", str(home))
    return RunRegistry(home)


def _page(query: dict) -> AppTest:
    app = AppTest.from_file(APP, default_timeout=120)
    app.query_params.update(query)
    return app


# ------------------------------------------------------------------------------ pure helpers
def test_widget_terms_replace_flags_and_fields():
    text = widget_terms("Dataset path /x does not exist. Pass `--data` an existing folder; `data.input_size` is 7; `--bias` too.")
    assert "`Dataset folder`" in text and "`Input size`" in text and "--data" not in text
    assert "`--bias`" in text  # no sidebar widget: left as it is


def test_the_monitor_line_gives_the_step_and_the_time_left_of_its_stage():
    rows = [
        (0.0, {"fraction": 0.0, "stage": "load", "step": 1, "steps": 2, "stage_fraction": 0.0, "message": "Loading"}),
        (10.0, {"fraction": 0.5, "stage": "filters", "step": 2, "steps": 2, "stage_fraction": 0.0, "message": "Fitting CFE heads"}),
        (20.0, {"fraction": 0.6, "stage": "filters", "step": 2, "steps": 2, "stage_fraction": 0.2, "message": "Fitting CFE heads: MC heads epoch 4/20"}),
    ]
    progress = read_progress(rows, now=20.0)
    assert progress.fraction == 0.6 and progress.stage == "filters"
    assert progress.describe() == "Step 2 of 2 · Fitting CFE heads: MC heads epoch 4/20 · about 40 s left in this step"
    assert read_progress(rows[:2], now=10.0).describe().endswith("estimating the time left…")
    assert read_progress([]).fraction == 0.0 and read_progress([]).describe().startswith("Starting")


# ------------------------------------------------------------------------------ sidebar (inline)
def test_preprocessing_fields_are_in_the_sidebar_and_the_url(app, demo_workspace):
    app.run()
    _ok(app)
    labels = [t.label for t in app.sidebar.text_input]
    assert labels[3:7] == ["Input size", "Mean", "Std", "Target layer"]
    assert "224" in app.sidebar.text_input[3].placeholder and "32" in app.sidebar.text_input[3].placeholder
    # the demo's own defaults, spelled out: same workspace, same cache
    app.sidebar.text_input[3].set_value("32")
    app.sidebar.text_input[4].set_value("0.5,0.5,0.5")
    app.sidebar.text_input[5].set_value("0.25, 0.25, 0.25")
    app.sidebar.text_input[6].set_value(demo_workspace.target.name)
    app.sidebar.button[0].click().run()
    _ok(app)
    assert not app.error, [e.value for e in app.error]
    q = {k: _value(v) for k, v in app.query_params.items()}
    assert (q["size"], q["mean"], q["std"], q["layer"]) == ("32", "0.5,0.5,0.5", "0.25,0.25,0.25", demo_workspace.target.name)
    again = AppTest.from_file(APP, default_timeout=180)
    again.query_params.update(q)
    again.run()
    _ok(again)
    assert [t.value for t in again.sidebar.text_input[3:7]] == ["32", "0.5,0.5,0.5", "0.25,0.25,0.25", demo_workspace.target.name]


def test_a_bad_folder_names_the_widget_and_falls_back_to_the_previous_workspace(app, tmp_path):
    app.run()
    app.sidebar.selectbox[0].set_value("a folder…")
    app.sidebar.text_input[2].set_value(str(tmp_path / "missing"))
    app.sidebar.button[0].click().run()
    _ok(app)
    errors = [e.value for e in app.error]
    assert any("does not exist" in e and "`Dataset folder`" in e for e in errors), errors
    assert not any("--data" in e for e in errors)
    assert _value(app.query_params["data"]) == "biased-digits"  # the bad parameter is gone
    assert [m.label for m in app.metric][:1] == ["Train accuracy"]  # the previous workspace is drawn


def test_a_bad_input_size_names_the_widget(app):
    app.run()
    app.sidebar.text_input[3].set_value("big")
    app.sidebar.button[0].click().run()
    _ok(app)
    assert any("`Input size`" in e.value for e in app.error), [e.value for e in app.error]
    assert "size" not in app.query_params


# ------------------------------------------------------------------------------ background runs
@pytest.mark.slow
def test_a_folder_loads_in_one_background_run_that_sessions_share_and_pick_up(background, tmp_path):
    data = tiny_tree(tmp_path / "data")
    query = {"model": "demo-cnn", "data": str(data), "size": "32"}
    first = _page(query)
    first.run()
    _ok(first)
    assert first.get("progress"), "the page shows the run's progress bar"
    assert not first.metric  # the page stopped at the monitor; it does not wait for the run
    second = _page(query)  # another browser session asking for the same workspace
    second.run()
    _ok(second)
    runs = background.list("prepare")
    assert len(runs) == 1, [(r.run_id, r.status) for r in runs]
    _wait_for_runs(background)
    assert [r["stage"] for r in background.progress(runs[0].run_id)][-1] == "extract"
    third = _page(query)  # the next visitor, after the tab was closed
    third.run()
    _ok(third)
    assert not third.error, [e.value for e in third.error]
    assert [m.label for m in third.metric] == ["Train accuracy", "Val accuracy", "Test accuracy", "Test errors"]
    assert len(background.list("prepare")) == 1  # everything came from the cache


@pytest.mark.slow
def test_random_weights_warn_and_train_on_this_data_switches_to_the_trained_weights(background, tmp_path):
    data = tiny_tree(tmp_path / "data")
    app = _page({"model": "resnet18", "data": str(data), "size": "32"})
    app.run()
    _ok(app)
    assert any("random weights" in w.value for w in app.warning), [w.value for w in app.warning]
    train = [b for b in app.button if b.label == "Train on this data"]
    assert train
    train[0].click().run()
    _ok(app)
    kinds = sorted(r.config["train"] for r in background.list("prepare"))
    assert kinds == [False, True]  # the random model's features, and the training run
    _wait_for_runs(background)
    app.run()
    _ok(app)
    weights = _value(app.query_params.get("weights"))
    assert weights and Path(weights).is_file() and Path(weights).name == "model.pt"
    assert not any("random weights" in w.value for w in app.warning)
    _wait_for_runs(background)  # the trained model's features, extracted by a background run
    app.run()  # the trained model's page: its training curves, read from the weights' store entry
    _ok(app)
    assert any(e.label.startswith("How this model was trained") for e in app.expander)
    assert len(app.get("plotly_chart")) >= 3


def test_prepare_runs_detect_the_cfe_seeds_report_judges_over(tmp_path):
    """The Flagged page's verdict asks a prepare run for CFE seeds 0, 1, 2 (as `report`): the spec
    says so only then (the default stays seed 0), and a run that made fewer seeds is not mistaken
    for one that failed to make them."""
    from types import SimpleNamespace

    from cfdebug.config import WorkspaceConfig
    from cfdebug.jobs import prepare_key, prepare_spec
    from cfdebug.ui.workspace import _stages_reached

    cfg = WorkspaceConfig(workdir=str(tmp_path))
    assert "detect_seeds" not in prepare_spec(cfg, "detect")
    spec = prepare_spec(cfg, "detect", detect_seeds=(0, 1, 2))
    assert spec["detect_seeds"] == [0, 1, 2] and spec["key"] == prepare_key(cfg)  # joins a run making the same workspace
    seed0 = SimpleNamespace(config=prepare_spec(cfg, "detect"))
    assert _stages_reached(seed0, "detect") and not _stages_reached(seed0, "detect", (0, 1, 2))
    assert _stages_reached(SimpleNamespace(config=spec), "detect", (0, 1, 2))


@pytest.mark.slow
def test_resnet18_at_32_px_draws_grad_cam_where_it_says_something(tmp_path, monkeypatch):
    """resnet18's layer4 is 1×1 at 32 px: the pages default to layer2 (4×4) and say why; picking
    layer4 in the sidebar brings a warning that its map is a flat tint."""
    monkeypatch.setenv("CFDEBUG_HOME", str(tmp_path / "home"))
    data = tiny_tree(tmp_path / "data")
    query = {"model": "resnet18", "data": str(data), "size": "32", "image": "0"}
    app = _page(query)
    app.switch_page("views/browser.py").run()  # inline (AppTest): the random model's features are computed here
    _ok(app)
    picker = [s for s in app.sidebar.selectbox if s.label == "Grad-CAM layer"][0]
    assert picker.value == "layer2" and picker.options[0] == "layer2 (4×4) · default"
    notes = [c.value for c in app.caption if c.value.startswith("Grad-CAM at `layer2` (4×4 map)")]
    assert notes and "`layer4` is 1×1 at 32 px" in notes[0]
    assert not any("flat tint that carries no location" in w.value for w in app.warning)
    picker.set_value("layer4").run()
    _ok(app)
    assert _value(app.query_params["cam"]) == "layer4"
    assert any(w.value.startswith("Grad-CAM at `layer4` is a 1×1 map at 32 px") for w in app.warning)
