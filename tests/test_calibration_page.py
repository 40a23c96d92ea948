"""AppTest of the Calibration & robustness page with a finished XCR run created in-process."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from cfdebug.config import config_dict
from cfdebug.runs import RunRegistry, cancel
from cfdebug.xcr.report import run_xcr_report
from cfdebug.xcr.retrain import XCRConfig
from cfdebug.xcr.selector import SelectorConfig

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app.py"
VIEW = "views/calibration.py"
TINY = XCRConfig.demo(
    selector=SelectorConfig.demo(k=32, beta=0.001, epochs=1), epochs=1, corruptions=("gaussian_noise", "contrast"),
    severities=(1, 5), table1_ks=(32,), table1_betas=(0.001,),
)


def _small(ws):
    """The demo workspace on the first images of each split (its own cache key)."""
    small = copy.copy(ws)
    splits = {name: ws.data.splits[name].subset(np.arange(n)) for name, n in (("train", 192), ("val", 64), ("test", 96))}
    small.data = replace(ws.data, splits=splits, fingerprint=ws.data.fingerprint + "-small192-64-96")
    return small


@pytest.fixture(scope="module")
def finished_run(demo_workspace, workdir):
    """A done XCR run of the demo workspace whose result comes from ``run_xcr_report``."""
    result = run_xcr_report(_small(demo_workspace), TINY)
    registry = RunRegistry(workdir)
    record = registry.create("xcr", {"workspace": config_dict(demo_workspace.config), "xcr": config_dict(TINY)})
    registry.set_result(record.run_id, result)
    return record.run_id


@pytest.fixture
def page(demo_workspace, workdir, monkeypatch):
    """The page through app.py's navigation when it lists it, else the view file itself."""
    monkeypatch.setenv("CFDEBUG_HOME", str(workdir))
    if VIEW in APP.read_text():
        app = AppTest.from_file(str(APP), default_timeout=180)
        app.run()
        app.switch_page(VIEW)
    else:
        app = AppTest.from_file(str(ROOT / VIEW), default_timeout=180)
    return app


def _ok(app):
    assert not app.exception, [e.value for e in app.exception]
    assert not app.error, [e.value for e in app.error]


@pytest.mark.slow
def test_page_shows_tables_figures_and_gallery_of_a_finished_run(page, finished_run):
    page.query_params["run"] = finished_run  # other tests may have finished newer runs
    page.run()
    _ok(page)
    assert page.query_params["run"] in ([finished_run], finished_run)
    charts = page.get("plotly_chart")
    assert len(charts) >= 4  # reliability clean + corrupt, accuracy and ECE vs severity
    assert len(page.dataframe) >= 1
    downloads = page.get("download_button")
    assert any("Table 2" in d.proto.label for d in downloads)
    assert len(page.get("image")) == 8 * 4  # image, mask, T(x), Grad-CAM for 8 test images
    corruption = [s for s in page.selectbox if s.label == "Corruption"][0]
    assert corruption.options[0] == "mean over corruptions"
    corruption.set_value("contrast").run()
    _ok(page)
    [t for t in page.toggle if t.label.startswith("Include temperature")][0].set_value(True).run()
    _ok(page)


def test_page_monitors_an_active_run(page, demo_workspace, workdir, finished_run):
    registry = RunRegistry(workdir)
    spec = {"workspace": config_dict(demo_workspace.config), "xcr": config_dict(TINY), "estimate": {"low": 120.0, "high": 240.0}}
    record = registry.create("xcr", spec)
    try:
        page.run()
        _ok(page)
        assert any(record.run_id in (p.proto.text or "") for p in page.get("progress"))
        assert any(b.label == "Cancel run" for b in page.button)
        assert any(c.value.startswith("estimated at launch: 2–4 min") for c in page.caption)  # the monitor holds the run to it
    finally:
        cancel(registry, record.run_id)


def test_the_form_shows_what_the_run_does_and_its_estimate_and_no_stale_box_while_a_run_goes(demo_workspace, tmp_path, monkeypatch):
    """The form's defaults are the run (one k, one β, no Table 1 sweep); it says how long that takes
    here, from a few steps timed now, and what the sweep would take; while a run is going the page
    says so instead of "start one above"."""
    home = tmp_path / "home"  # no finished XCR run here
    monkeypatch.setenv("CFDEBUG_HOME", str(home))
    page = AppTest.from_file(str(ROOT / VIEW), default_timeout=180).run()
    _ok(page)
    k = [n for n in page.number_input if n.label == "k (patches kept)"][0]
    assert k.value == 32 and [c for c in page.checkbox if c.label == "Table 1 sweep (paper B)"][0].value is False
    text = " ".join(m.value for m in page.markdown)
    assert "one selector at **k = 32, β = 0.001**" in text and "**Estimated time: " in text and "With the Table 1 sweep: " in text
    parts = page.dataframe[0].value
    assert any(p.startswith("Table 1: 1 selector to train") for p in parts["part"]) and (parts["seconds"] >= 0).all()
    assert any("Start one above" in i.value for i in page.info)
    ws_config = replace(demo_workspace.config, workdir=str(home))
    record = RunRegistry(home).create("xcr", {"workspace": config_dict(ws_config), "xcr": config_dict(TINY)})
    try:
        page.run()
        _ok(page)
        infos = [i.value for i in page.info]
        assert any("in progress" in i for i in infos) and not any("Start one above" in i for i in infos), infos
    finally:
        cancel(RunRegistry(home), record.run_id)


@pytest.mark.slow
def test_cli_xcr_is_a_registry_run_the_page_lists(demo_workspace, workdir, tmp_path, monkeypatch, capsys):
    """`python -m cfdebug xcr` in a terminal registers its run, as `treat` does, so the page lists it."""
    from cfdebug.cli import main

    home = tmp_path / "home"
    args = ["xcr", "--workdir", str(home), "--selector-epochs", "1", "--xcr-epochs", "1", "--seeds", "0",
            "--corruptions", "gaussian_noise", "--severities", "1", "--max-corrupt-images", "32", "--quiet"]
    assert main(args) == 0
    runs = RunRegistry(home).list(kind="xcr")
    assert [r.status for r in runs] == ["done"] and runs[0].result["table2"]
    mine, stored = config_dict(demo_workspace.config), runs[0].config["workspace"]
    assert (stored["model"], stored["data"]) == (mine["model"], mine["data"])  # the page lists it (ui.runs.workspace_runs)
    assert f"run {runs[0].run_id}" in capsys.readouterr().err
