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
    record = registry.create("xcr", {"workspace": config_dict(demo_workspace.config), "xcr": config_dict(TINY)})
    try:
        page.run()
        _ok(page)
        assert any(record.run_id in (p.proto.text or "") for p in page.get("progress"))
        assert any(b.label == "Cancel run" for b in page.button)
    finally:
        cancel(registry, record.run_id)


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
