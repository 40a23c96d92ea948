"""`serve --read-only` holds: whatever the URL, a visitor opens the preset workspaces only, starts no
run, sees no Cancel button and no server path; a failed run's error is a fixed sentence for a
visitor and the details for the owner; an image file outside the allowed folders is not shown."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from cfdebug import access
from cfdebug.access import READ_ONLY_WORKSPACE_MESSAGE, check_workspace, is_preset
from cfdebug.config import DataConfig, ModelConfig, WorkspaceConfig, XCRConfig
from cfdebug.errors import CfdebugError
from cfdebug.jobs import xcr_spec
from cfdebug.runs import RunRegistry

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["overview", "class_filters", "flagged", "browser", "treatment", "revise", "calibration"]
URLS = [{}, {"size": "48"}, {"std": "0.3,0.3,0.3"}, {"model": "resnet18", "data": "hard-digits"}, {"data": "/etc", "layer": "features.0"}]
TEXT_ELEMENTS = ("markdown", "caption", "info", "error", "warning", "success", "code", "text", "title", "header", "subheader", "exception")


@pytest.fixture
def visitor(tmp_path, monkeypatch):
    """A read-only dashboard on an empty CFDEBUG_HOME (nothing cached, nothing trained) whose
    pages would start background runs (not inline)."""
    home = tmp_path / "home"
    monkeypatch.setenv("CFDEBUG_HOME", str(home))
    monkeypatch.delenv("CFDEBUG_DASHBOARD_INLINE", raising=False)
    monkeypatch.delenv("CFDEBUG_ROOTS", raising=False)
    monkeypatch.setenv("CFDEBUG_READ_ONLY", "1")
    return home


def _open(page: str, query: dict) -> AppTest:
    app = AppTest.from_file(str(ROOT / "views" / f"{page}.py"), default_timeout=180)
    app.query_params.update(query)
    return app.run()


def _page_text(app: AppTest) -> list[str]:
    """Every text the page shows, the sidebar included, and the progress bars' text."""
    texts = [str(e.value) for kind in TEXT_ELEMENTS for e in app.get(kind)]  # the whole tree: main and sidebar
    return texts + [p.proto.text or "" for p in app.get("progress")]


def _server_paths(home: Path) -> list[str]:
    return [str(home), str(home.parent), str(ROOT), "/runs/", "run.json", "log.txt"]


# ------------------------------------------------------------------------------ presets
def test_preset_means_every_field_of_the_workspace(tmp_path):
    wd = str(tmp_path)
    assert is_preset(WorkspaceConfig(workdir=wd)) and is_preset(WorkspaceConfig(data=DataConfig(source="hard-digits"), device="cpu", workdir=wd))
    for cfg in [
        WorkspaceConfig(data=DataConfig(input_size=48), workdir=wd), WorkspaceConfig(data=DataConfig(std=(0.3, 0.3, 0.3)), workdir=wd),
        WorkspaceConfig(data=DataConfig(mean=(0.5, 0.5, 0.5)), workdir=wd), WorkspaceConfig(data=DataConfig(bias=0.5), workdir=wd),
        WorkspaceConfig(model=ModelConfig(layer="features.0"), workdir=wd), WorkspaceConfig(model=ModelConfig(name="resnet18"), workdir=wd),
    ]:
        assert not is_preset(cfg), cfg


def test_read_only_refuses_a_non_preset_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("CFDEBUG_READ_ONLY", "1")
    check_workspace(WorkspaceConfig(workdir=str(tmp_path)))
    with pytest.raises(CfdebugError) as err:
        check_workspace(WorkspaceConfig(data=DataConfig(input_size=48), workdir=str(tmp_path)))
    assert str(err.value) == READ_ONLY_WORKSPACE_MESSAGE


# ------------------------------------------------------------------------------ every page, any URL
@pytest.mark.parametrize("query", URLS, ids=lambda q: "&".join(f"{k}={v}" for k, v in q.items()) or "preset")
@pytest.mark.parametrize("page", PAGES)
def test_a_visitor_starts_no_run_and_sees_no_cancel_nor_server_path(visitor, page, query):
    app = _open(page, query)
    assert not app.exception, [e.value for e in app.exception]
    assert RunRegistry(visitor).list() == []  # no prepare run started: nothing is cached, nothing trains
    assert not any("Cancel" in b.label for b in app.button)
    text = " ".join(_page_text(app))
    assert not [p for p in _server_paths(visitor) if p in text], text
    if query:  # not a preset: refused, and the preset opens instead
        assert READ_ONLY_WORKSPACE_MESSAGE in [e.value for e in app.error]
    if page in ("overview", "class_filters", "flagged", "browser"):  # these need features: not cached, and not computed
        assert any("computes nothing" in i.value for i in app.info), [i.value for i in app.info]


# ------------------------------------------------------------------------------ a failed run's error
@pytest.mark.parametrize("read_only", [True, False])
def test_a_failed_runs_error_is_a_fixed_sentence_for_a_visitor_and_the_details_for_the_owner(visitor, monkeypatch, read_only):
    if not read_only:
        monkeypatch.delenv("CFDEBUG_READ_ONLY")
    registry = RunRegistry(visitor)
    record = registry.create("xcr", xcr_spec(WorkspaceConfig(model=ModelConfig(), data=DataConfig(), workdir=str(visitor)), XCRConfig.demo()))
    detail = f"Expected `cifar10c_dir` to be the CIFAR-10-C folder, but '{visitor.parent / 'missing'}' is not a folder; see {record.config_path}"
    registry.set_status(record.run_id, "failed", error=detail)
    app = _open("calibration", {})
    assert not app.exception, [e.value for e in app.exception]
    errors = [e.value for e in app.error]
    if read_only:
        assert errors == [f"Run `{record.run_id}` failed. The details are shown to whoever runs this dashboard (it is read-only)."]
        assert not [p for p in _server_paths(visitor) if p in " ".join(_page_text(app))]
    else:
        assert len(errors) == 1 and str(record.config_path) in errors[0] and "is not a folder" in errors[0]


# ------------------------------------------------------------------------------ images outside the roots
def _folder_with_an_outward_link(tmp_path, name: str):
    """A dataset folder holding one image of its own and a symlink to an image outside it; the
    workspace stand-in :func:`sample_images` reads (the open dataset is that folder)."""
    from cfdebug.config import DataConfig, WorkspaceConfig

    data, outside = tmp_path / name, tmp_path / "outside"
    (data / "test" / "a").mkdir(parents=True)
    outside.mkdir()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(data / "test" / "a" / "own.png")
    Image.new("RGB", (8, 8), (250, 0, 0)).save(outside / "secret.png")
    (data / "test" / "a" / "secret.png").symlink_to(outside / "secret.png")
    paths = (str(data / "test" / "a" / "own.png"), str(data / "test" / "a" / "secret.png"))
    split = SimpleNamespace(paths=paths, load_image=lambda i: np.asarray(Image.open(paths[i]).convert("RGB")))
    config = WorkspaceConfig(data=DataConfig(source=str(data)), workdir=str(tmp_path / "wd"))
    return data, paths, SimpleNamespace(data=SimpleNamespace(splits={"test": split}), config=config)


def test_an_image_linked_from_outside_the_roots_is_not_shown(tmp_path, monkeypatch):
    from cfdebug.ui.workspace import WITHHELD_IMAGE, sample_images

    data, paths, ws = _folder_with_an_outward_link(tmp_path, "data")
    monkeypatch.setenv("CFDEBUG_ROOTS", str(data))
    monkeypatch.setattr(access, "START_DIR", data)  # the folder the dashboard started from is a root too
    own, secret = sample_images(ws, "test", [0, 1])
    assert own.shape == (8, 8, 3) and tuple(own[0, 0]) == (10, 200, 30)
    assert secret is WITHHELD_IMAGE
    assert access.image_allowed(paths[0]) and not access.image_allowed(paths[1])


def test_a_folder_opened_outside_the_roots_shows_its_own_images_not_what_they_link_to(tmp_path, monkeypatch):
    """A personal dashboard opens a typed folder anywhere: its images show, a symlink in it that
    points outside still shows as the grey square."""
    from cfdebug.ui.workspace import WITHHELD_IMAGE, sample_images

    _, paths, ws = _folder_with_an_outward_link(tmp_path, "mine")
    monkeypatch.delenv("CFDEBUG_ROOTS", raising=False)
    monkeypatch.delenv("CFDEBUG_SHARED", raising=False)
    own, secret = sample_images(ws, "test", [0, 1])
    assert tuple(own[0, 0]) == (10, 200, 30) and secret is WITHHELD_IMAGE
    assert not access.image_allowed(paths[0])  # outside the roots: only the open dataset's folder lets it show
