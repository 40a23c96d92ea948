"""End to end: the real dashboard in headless Chromium, one screenshot per page."""

from __future__ import annotations

import shutil
from urllib.parse import quote

import pytest

from dashboard import assert_no_error_elements, browser_page, running_dashboard

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# (url path, text that appears once the page has computed, selector to wait for)
PAGES = [
    ("", "Sample test predictions", ".js-plotly-plot .heatmaplayer"),
    ("class_filters", "Causal check", ".js-plotly-plot .heatmaplayer"),
    ("flagged", "One prediction", ".js-plotly-plot .scatterlayer"),
    ("browser", "Sample browser", '[data-testid="stImage"]'),
    ("treatment", "Runs", '[data-testid="stForm"]'),
    ("calibration", "Calibration & robustness", '[data-testid="stForm"]'),
]


@pytest.fixture(scope="module")
def dashboard_url(demo_workspace, workdir, tmp_path_factory):
    demo_workspace.extractions.get("test")  # warm the cache the server will read
    log = tmp_path_factory.mktemp("streamlit") / "streamlit.log"
    with running_dashboard(workdir, log) as url:
        yield url


@pytest.mark.parametrize("path,ready_text,plot", PAGES, ids=["overview", "class_filters", "flagged", "browser", "treatment", "calibration"])
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


def test_sample_browser_link_restores_a_selection(dashboard_url, demo_workspace, tmp_path):
    """A shared link (errors of true class 3, lowest agreement first, one image open) reopens that view."""
    test = demo_workspace.extractions.get("test")
    errors = [i for i in range(len(test.labels)) if test.preds[i] != test.labels[i] and test.labels[i] == 3]
    assert errors
    query = f"outcome=error&true=3&sort=agreement+%E2%86%91&image={errors[0]}"
    with browser_page() as page:
        page.goto(f"{dashboard_url}/browser?{query}", wait_until="domcontentloaded")
        page.get_by_text("test image", exact=False).first.wait_for(timeout=180_000)
        page.locator(".js-plotly-plot .barlayer").first.wait_for(timeout=60_000)  # the open image's filter bars
        page.wait_for_timeout(1500)
        assert_no_error_elements(page)
        body = page.locator("body").inner_text()
        image_id = str(demo_workspace.data.splits["test"].ids[errors[0]]).split("/")[-1]
        assert f"test image {image_id}" in body and "(index" not in body and "Grad-CAM toward" in body  # one id
        assert f"**{len(errors)}**".strip("*") in body  # "N of 539 test predictions match"
        captions = page.locator('[data-testid="stCaptionContainer"]').all_inner_texts()
        tiles = [c for c in captions if c.startswith(("✓", "✗"))]
        assert tiles and all(c.startswith("✗") and "true 3 ·" in c for c in tiles), tiles
        # Each row's tiles: images, then buttons, line up (a caption under its button can wrap freely).
        buttons = page.get_by_role("button", name="open", exact=True)
        tops = [round(buttons.nth(i).bounding_box()["y"]) for i in range(min(buttons.count(), 8))]
        assert len(set(tops)) == 1, tops
        for key in ("outcome=error", "true=3", f"image={errors[0]}"):
            assert key in page.url, (key, page.url)
        page.screenshot(path=str(tmp_path / "browser_link.png"), full_page=True)


def test_own_folder_with_a_random_torchvision_model_warns_on_the_page(tmp_path, monkeypatch):
    """A user's ImageFolder tree with resnet18 and no weights: the random-weights warning and the
    Train action are on the page (not only in the server log), with no error elements."""
    from test_prepare_job import tiny_tree

    data = tiny_tree(tmp_path / "my data")
    monkeypatch.setenv("CFDEBUG_ROOTS", str(tmp_path))
    monkeypatch.delenv("CFDEBUG_READ_ONLY", raising=False)
    query = f"model=resnet18&data={quote(str(data))}&size=32"
    with running_dashboard(tmp_path / "home", tmp_path / "streamlit.log") as url, browser_page() as page:
        page.goto(f"{url}/?{query}", wait_until="domcontentloaded")
        page.get_by_text("resnet18 has random weights.", exact=False).first.wait_for(timeout=180_000)
        page.get_by_role("button", name="Train on this data").wait_for(timeout=60_000)
        page.wait_for_timeout(1000)
        assert_no_error_elements(page)
        page.screenshot(path=str(tmp_path / "random_weights.png"), full_page=True)
        # Your own data gets its next steps too, Revise among them.
        nexts = page.get_by_text("Your own data", exact=False).first
        nexts.wait_for(timeout=60_000)
        assert "Revise" in page.locator("body").inner_text()
