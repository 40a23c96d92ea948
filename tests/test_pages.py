"""AppTest runs of app.py and every page, on the session's cached demo workspace."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")


@pytest.fixture
def app(demo_workspace, workdir, monkeypatch):
    monkeypatch.setenv("CFDEBUG_HOME", str(workdir))
    return AppTest.from_file(APP, default_timeout=180)


def test_overview_is_the_default_page(app, demo_workspace):
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    assert not app.error, [e.value for e in app.error]
    labels = [m.label for m in app.metric]
    assert labels == ["Train accuracy", "Val accuracy", "Test accuracy", "Test errors"]
    test_acc = demo_workspace.extractions.get("test").accuracy
    assert app.metric[2].value == f"{100 * test_acc:.1f}%"
    assert app.query_params["model"] == ["demo-cnn"] or app.query_params["model"] == "demo-cnn"


def test_errors_only_toggle_shows_only_errors(app):
    app.run()
    assert not all(c.startswith("✗") for img in app.get("image") for c in img.captions)
    app.toggle[0].set_value(True).run()
    assert not app.exception
    captions = [c for img in app.get("image") for c in img.captions]
    assert len(captions) == 24
    assert all(c.startswith("✗") for c in captions), captions


def test_bad_dataset_path_shows_st_error(app, tmp_path):
    app.run()
    app.sidebar.selectbox[0].set_value("a folder…")
    app.sidebar.text_input[2].set_value(str(tmp_path / "missing"))
    app.sidebar.button[0].click().run()
    assert not app.exception, [e.value for e in app.exception]
    assert any("does not exist" in e.value for e in app.error)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_pages_never_import_torch():
    for page in [ROOT / "app.py", *sorted((ROOT / "views").glob("*.py"))]:
        assert "torch" not in _imports(page), page


def test_library_imports_streamlit_only_in_ui():
    for module in (ROOT / "cfdebug").rglob("*.py"):
        if "ui" in module.relative_to(ROOT / "cfdebug").parts:
            continue
        assert "streamlit" not in _imports(module), module


def test_class_filters_page_and_causal_check(app):
    app.run()
    app.switch_page("views/class_filters.py").run()
    assert not app.exception, [e.value for e in app.exception]
    assert not app.error, [e.value for e in app.error]
    assert len(app.get("image")) >= 4  # top-activating training images
    app.selectbox[0].set_value(3).run()
    assert app.query_params["class"] in (["3"], "3")
    [b for b in app.button if b.label == "Run causal check"][0].click().run()
    values = {m.label: float(m.value) for m in app.metric}
    mc = values["Drop, top-5 MC filters zeroed"]
    rnd = values["Drop, 5 random filters"]
    assert mc > rnd, (mc, rnd)


def test_flagged_page_threshold_slider_updates_counts(app):
    app.run()
    app.switch_page("views/flagged.py").run()
    assert not app.exception, [e.value for e in app.exception]
    assert not app.error, [e.value for e in app.error]
    flagged = {m.label: m.value for m in app.metric}
    before = int(flagged["Flagged"])
    assert before > 0 and app.query_params["image"]
    # The review budget is the default: 10% of the test predictions, the same count as MSP's.
    assert app.query_params["rule"] in ("budget", ["budget"]) and "Precision of the flags (errors among flagged)" in flagged
    assert before == 54  # ceil(10% of the demo's 539 test predictions)
    text = " ".join(m.value for m in app.markdown)
    assert "Does MC agreement find errors better than MSP?" in text and "AUROC" in text
    assert any(v in text for v in ("better", "worse", "no detectable difference"))
    app.slider[0].set_value(app.slider[0].min).run()  # a 1% budget flags fewer
    after = int({m.label: m.value for m in app.metric}["Flagged"])
    assert after < before and app.query_params["budget"] in ("1", ["1"])
    app.radio[0].set_value("Paper rule").run()  # the paper's rule with its threshold slider
    assert app.query_params["rule"] in ("paper", ["paper"])
    app.slider[0].set_value(app.slider[0].min).run()  # the lowest threshold flags (almost) nothing
    assert int({m.label: m.value for m in app.metric}["Flagged"]) <= before
    assert not app.exception


@pytest.mark.slow
def test_treatment_page_launches_a_background_run(app, workdir):
    import time

    from cfdebug.runs import RunRegistry

    app.run()
    app.switch_page("views/treatment.py").run()
    assert not app.exception, [e.value for e in app.exception]
    before = {r.run_id for r in RunRegistry(workdir).list("treat")}
    app.number_input[0].set_value(2)  # epochs
    [n for n in app.number_input if n.label == "Seeds"][0].set_value(2)  # two seeds: the verdict gets an interval
    [b for b in app.button if b.label == "Launch run"][0].click().run()
    new = [r for r in RunRegistry(workdir).list("treat") if r.run_id not in before]
    assert len(new) == 1
    run_id = new[0].run_id
    deadline = time.monotonic() + 300
    while RunRegistry(workdir).get(run_id).status in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(1)
    record = RunRegistry(workdir).get(run_id)
    assert record.status == "done", (record.status, record.error, (record.run_dir / "log.txt").read_text()[-2000:])
    assert len(RunRegistry(workdir).progress(run_id)) == 8  # 2 seeds × (2 epochs of the control + 2 of the treatment)
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    text = " ".join(m.value for m in app.markdown)
    assert "Did the treatment beat its CE control?" in text and "CE control" in text
    assert any(v in text for v in ("better", "worse", "no detectable difference"))
    labels = [m.label for m in app.metric]
    assert any(label.startswith("Treated (best on val") for label in labels) and "Control (CE fine-tune)" in labels
    assert not app.error, [e.value for e in app.error]
    assert any(m.value.startswith("**Treated vs control**") for m in app.markdown)  # read from the stored result (control predictions kept)

    # A run made before results stored the per-image predictions: a clear error, nothing re-predicted.
    registry = RunRegistry(workdir)
    done = registry.get(run_id)
    old = registry.create("treat", done.config)
    registry.set_result(old.run_id, {k: v for k, v in done.result.items() if k != "best_test"})
    app.query_params["run"] = old.run_id
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    assert any("older version of cfdebug" in e.value for e in app.error)
    assert not any("test errors fixed" in m.value for m in app.markdown)
