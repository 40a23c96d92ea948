"""End to end: the real dashboard in headless Chromium, one screenshot per page."""

from __future__ import annotations

import shutil

import pytest

from dashboard import assert_no_error_elements, browser_page, running_dashboard

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# (url path, text that appears once the page has computed, selector to wait for)
PAGES = [
    ("", "Sample test predictions", ".js-plotly-plot .heatmaplayer"),
    ("class_filters", "Causal check", ".js-plotly-plot .heatmaplayer"),
    ("flagged", "One prediction", ".js-plotly-plot .scatterlayer"),
    ("treatment", "Runs", '[data-testid="stForm"]'),
    ("calibration", "Calibration & robustness", '[data-testid="stForm"]'),
]


@pytest.fixture(scope="module")
def dashboard_url(demo_workspace, workdir, tmp_path_factory):
    demo_workspace.extractions.get("test")  # warm the cache the server will read
    log = tmp_path_factory.mktemp("streamlit") / "streamlit.log"
    with running_dashboard(workdir, log) as url:
        yield url


@pytest.mark.parametrize("path,ready_text,plot", PAGES, ids=["overview", "class_filters", "flagged", "treatment", "calibration"])
def test_page_renders_without_errors(dashboard_url, path, ready_text, plot, tmp_path, request):
    with browser_page() as page:
        page.goto(f"{dashboard_url}/{path}", wait_until="domcontentloaded")
        page.get_by_text(ready_text, exact=True).first.wait_for(timeout=180_000)
        page.locator(plot).first.wait_for(timeout=60_000)
        page.wait_for_timeout(1500)
        shot = tmp_path / f"{request.node.callspec.id}.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        assert_no_error_elements(page)
        if path == "":
            assert page.get_by_text("Confusion matrix (test)").count() >= 1
        if path == "flagged":
            # the selected image lives in the URL, so a link reopens the same view
            page.wait_for_function("() => window.location.search.includes('image=')", timeout=30_000)
    target = request.config.getoption("--screenshots", default=None)
    if target:
        shutil.copy(shot, f"{target}/{request.node.callspec.id}.png")
