"""End to end: the real dashboard in headless Chromium, one screenshot per page."""

from __future__ import annotations

import pytest

from dashboard import assert_no_error_elements, browser_page, running_dashboard

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_overview_renders_confusion_matrix(demo_workspace, workdir, tmp_path):
    demo_workspace.extractions.get("test")  # warm the cache the server will read
    with running_dashboard(workdir, tmp_path / "streamlit.log") as url, browser_page() as page:
        page.goto(url, wait_until="domcontentloaded")
        page.get_by_text("Confusion matrix (test)").first.wait_for(timeout=90_000)
        page.locator(".js-plotly-plot .heatmaplayer").first.wait_for(timeout=30_000)
        page.get_by_text("Sample test predictions").wait_for(timeout=30_000)
        page.wait_for_timeout(1000)
        shot = tmp_path / "overview.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        assert_no_error_elements(page)
        assert page.get_by_text("Test accuracy").count() >= 1
