"""AppTest runs of app.py and every page, on the session's cached demo workspace."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")


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


def test_bad_dataset_path_shows_st_error(app, tmp_path, monkeypatch):
    monkeypatch.setenv("CFDEBUG_ROOTS", str(tmp_path))  # an allowed root, so the loader's own message shows
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

    from cfdebug.runs import RunRegistry, progress_of

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
    progress = progress_of(RunRegistry(workdir), run_id)
    assert len(progress.epochs) == 8  # 2 seeds × (2 epochs of the control + 2 of the treatment)
    assert progress.fraction == 1.0 and progress.stage == "detect" and progress.steps == 4
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    text = " ".join(m.value for m in app.markdown)
    assert "Did the treatment beat its CE control?" in text and "CE control" in text
    assert any(v in text for v in ("better", "worse", "no detectable difference"))
    labels = [m.label for m in app.metric]
    assert any(label.startswith("Treated (best on val") for label in labels) and "Control (CE fine-tune)" in labels
    assert not app.error, [e.value for e in app.error]
    assert any(m.value.startswith("**Treated vs control**") for m in app.markdown)  # read from the stored result (control predictions kept)
    # The flagged set under the rule chosen on the Flagged page (default: the 10% review budget), not the run's paper rule.
    assert any(m.value.startswith("**Flagged set, treated vs base** (review budget 10%") and "flagged predictions 54 → 54" in m.value
               for m in app.markdown), [m.value for m in app.markdown if "Flagged set" in m.value]
    runs_table = app.dataframe[0].value
    assert runs_table.loc[runs_table["run"] == run_id, "seeds"].item() == "2 seeds: 0, 1"
    assert not runs_table.isna().any().any() and not (runs_table.astype(str) == "None").any().any()
    assert any(e.label == "Per-epoch curves of this run" for e in app.expander)

    # A run made before results stored the per-image predictions: a clear error, nothing re-predicted.
    registry = RunRegistry(workdir)
    done = registry.get(run_id)
    old = registry.create("treat", done.config)
    registry.set_result(old.run_id, {k: v for k, v in done.result.items() if k != "best_test"})
    try:
        app.query_params["run"] = old.run_id
        app.run()
        assert not app.exception, [e.value for e in app.exception]
        assert any("older version of cfdebug" in e.value for e in app.error)
        assert not any("test errors fixed" in m.value for m in app.markdown)
    finally:  # the session's workdir is shared: later pages (the Chromium tests) must not open this fake run
        registry.set_status(old.run_id, "cancelled", error="a test's stand-in for a run made by an older cfdebug")


def _tile_captions(app) -> list[str]:
    """The captions under the browser's (or the Flagged gallery's) tiles: ✓/✗, classes, confidence."""
    return [c.value for c in app.caption if c.value.startswith(("✓", "✗"))]


def test_sample_browser_filters_sorts_and_restores_from_the_url(app, demo_workspace):
    app.query_params["outcome"] = "error"
    app.query_params["sort"] = "agreement ↑"
    app.run()
    app.switch_page("views/browser.py").run()
    assert not app.exception, [e.value for e in app.exception]
    assert not app.error, [e.value for e in app.error]
    test = demo_workspace.extractions.get("test")
    n_errors = int((test.preds != test.labels).sum())
    assert any(m.value.startswith(f"**{n_errors}** of {len(test.labels)} test predictions") for m in app.markdown)
    captions = _tile_captions(app)
    assert captions and all(c.startswith("✗") for c in captions), captions
    agreements = [float(c.rsplit("agr ", 1)[1]) for c in captions]  # one row of 8 columns per 8 tiles: row-major order
    assert agreements == sorted(agreements)  # lowest agreement first, row by row
    assert len(app.get("image")) == len(captions)  # each tile: its image, its button, its caption under the button
    # narrow to one true class: the URL follows
    [m for m in app.multiselect if m.label == "True class"][0].set_value([3]).run()
    assert app.query_params["true"] in ("3", ["3"])
    assert all("true 3 ·" in c for c in _tile_captions(app))
    # open the first tile: the detail shows Grad-CAM and the image index goes in the URL; the detail names it by one id
    [b for b in app.button if b.label == "open"][0].click().run()
    assert not app.exception, [e.value for e in app.exception]
    i = int(app.query_params["image"][0] if isinstance(app.query_params["image"], list) else app.query_params["image"])
    assert any(c.startswith("Grad-CAM toward") for img in app.get("image") for c in img.captions)
    assert any("proposed class" in m.value for m in app.markdown)
    image_id = str(demo_workspace.data.splits["test"].ids[i]).split("/")[-1]
    assert any(m.value == f"**test image {image_id}**" for m in app.markdown) and not any("(index" in m.value for m in app.markdown)


def test_sample_browser_train_split_and_confidence_range(app, demo_workspace):
    app.query_params["split"] = "train"
    app.query_params["conf_lo"] = "0.5"
    app.query_params["conf_hi"] = "0.9"
    app.run()
    app.switch_page("views/browser.py").run()
    assert not app.exception, [e.value for e in app.exception]
    train = demo_workspace.extractions.get("train")
    conf = train.probs.max(1)
    expected = int(((conf >= 0.5) & (conf <= 0.9)).sum())
    assert any(m.value.startswith(f"**{expected}** of {len(train.labels)} train predictions") for m in app.markdown)
    for c in _tile_captions(app):
        assert 0.5 <= float(c.rsplit("(", 1)[1].split(")")[0]) <= 0.9


def test_class_filters_rank_by_specificity_and_in_the_url(app, demo_workspace):
    from cfdebug.mcfilters import global_mc_filters, rank_filters

    app.query_params["class"] = "3"
    app.run()
    app.switch_page("views/class_filters.py").run()
    assert not app.exception, [e.value for e in app.exception]
    top = rank_filters(global_mc_filters(demo_workspace), 3, "specificity")[:4]
    shown = [m.value.split("**filter f")[1].split("**")[0] for m in app.markdown if m.value.startswith("**filter f")]
    assert shown == [str(f) for f in top]
    app.radio[0].set_value("magnitude").run()
    assert app.query_params["rank"] in ("magnitude", ["magnitude"])
    assert all(" · pred " in c for img in app.get("image") for c in img.captions)  # true/predicted captions


def test_flagged_threshold_in_the_url_and_csv_matches_the_screen(app):
    app.query_params["rule"] = "paper"
    app.query_params["threshold"] = "-0.05"
    app.run()
    app.switch_page("views/flagged.py").run()
    assert not app.exception, [e.value for e in app.exception]
    assert app.slider[0].value == -0.05
    flagged = int({m.label: m.value for m in app.metric}["Flagged"])
    assert app.query_params["threshold"] in ("-0.05", ["-0.05"])
    assert flagged > 0


def test_flagged_csv_is_what_the_screen_shows():
    import pandas as pd

    from cfdebug.ui.browser import flagged_export

    images = pd.DataFrame({"id": ["a", "b"], "true": [0, 1], "predicted": [0, 0], "proposed": [0, 1], "flagged": [True, False]})
    out = flagged_export(images, [False, True], [True, True], "budget 10%", ["zero", "one"])
    assert out["flagged"].tolist() == [False, True] and out["flagged_paper_rule"].tolist() == [True, False]
    assert out["predicted"].tolist() == ["zero", "zero"] and (out["rule"] == "budget 10%").all()
    assert images["flagged"].tolist() == [True, False]  # input untouched


def test_overview_measures_the_corner_square(app):
    app.run()
    text = " ".join(m.value for m in app.markdown)
    assert "Where the model looks" in text and "of the image" in text and "×" in text


def test_a_treatment_runs_epoch_rows_take_the_position_of_the_sweep(monkeypatch):
    """The engine's epoch rows (no position of their own) read with the job's rows around them:
    each epoch gets the sweep's position, the bar the job's fraction, and the time left is
    measured on the sweep's own rows, never a fixed promise."""
    import cfdebug.runs.progress
    from cfdebug.runs import RunStages, read_progress

    monkeypatch.setattr(cfdebug.runs.progress, "PROGRESS_EVERY_S", 0.0)  # every report is a row
    logged, clock = [], [100.0]
    stages = RunStages({"load": (0.0, 0.1), "sweep": (0.1, 1.0)}, lambda row: logged.append((clock[0], row)))
    stages.stage("load", "Loading")(1.0, "done")
    sweep = stages.stage("sweep", "Treatment sweep")
    for epoch in (1, 2):
        clock[0] += 10.0
        logged.append((clock[0], {"epoch": epoch, "loss": 1.0 / epoch, "lambda1": 0.0, "lambda2": 0.0, "seed": 0}))  # the engine's row
        sweep(epoch / 4, f"run 1/2: epoch {epoch}/2")
    progress = read_progress(logged, now=clock[0])
    assert progress.fraction == 0.1 + 0.9 * 0.5 and progress.stage == "sweep" and (progress.step, progress.steps) == (2, 2)
    assert [(e["epoch"], e["stage"]) for e in progress.epochs] == [(1, "sweep"), (2, "sweep")]
    assert progress.seconds_left == 20.0  # half the sweep in 20 s since it began
    assert progress.describe() == "Step 2 of 2 · Treatment sweep: run 1/2: epoch 2/2 · about 20 s left in this step"
    assert read_progress(logged[:3], now=100.0).describe().endswith("estimating the time left…")


def test_flagged_verdict_is_reports_over_three_cfe_seeds_and_survives_a_reload(app, demo_workspace, workdir, monkeypatch):
    """The Flagged card judges detection as `report` does (CFE seeds 0, 1, 2, the same budget) and
    says so; the Overview shows it from the workdir in a new session (a reload), not only in this one."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from cfdebug.claims import DEFAULT_BUDGET, DEFAULT_SEEDS, detection_claim
    from cfdebug.ui.verdicts import VERDICTS_FOLDER, sentence

    app.run()
    app.switch_page("views/flagged.py").run()
    assert not app.exception, [e.value for e in app.exception]
    text = " ".join(m.value for m in app.markdown)
    assert "(CFE seeds 0, 1, 2, as `python -m cfdebug report`)" in text
    expected = [c.as_dict() for c in detection_claim(demo_workspace, DEFAULT_SEEDS, DEFAULT_BUDGET)["comparisons"]]
    headline = next(r for r in expected if r["method"] == "mc_agreement" and r["metric"] == "auroc")
    assert headline["n_seeds"] == 3 and sentence(headline) in text  # the card's sentence is report's row
    assert list((Path(workdir) / VERDICTS_FOLDER).glob("*.json"))  # kept in the workdir

    reload = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=180).run()  # a new session
    assert not reload.exception, [e.value for e in reload.exception]
    assert any(m.value == "*detection*: " + sentence(headline) for m in reload.markdown)


def test_flagged_gallery_pages_through_every_flag_and_opens_a_tile(app):
    app.run()
    app.switch_page("views/flagged.py").run()
    assert not app.exception, [e.value for e in app.exception]
    pages = [n for n in app.number_input if n.label.startswith("Page (of")][0]
    assert pages.label.startswith("Page (of 4") and pages.max == 4  # 54 flagged, 16 per page: none out of reach
    pages.set_value(4).run()
    assert len(_tile_captions(app)) == 54 - 3 * 16
    opens = [b for b in app.button if b.label == "open"]
    assert len(opens) == 6
    opens[-1].click().run()
    assert not app.exception, [e.value for e in app.exception]
    picked = app.query_params["image"][0] if isinstance(app.query_params["image"], list) else app.query_params["image"]
    assert [s for s in app.selectbox if s.label.startswith("Image")][0].value == picked  # the tile opened below


def test_class_filters_ticked_filters_open_the_revise_page(app):
    app.query_params["class"] = "3"
    app.run()
    app.switch_page("views/class_filters.py").run()
    assert not app.exception, [e.value for e in app.exception]
    text = " ".join(m.value for m in app.markdown)
    assert "Where they fire, measured:" in text and "corner square" in text
    assert all("strongest in **" in m.value for m in app.markdown if m.value.startswith("**filter f"))
    boxes = [c for c in app.checkbox if c.label == "not evidence"]
    assert len(boxes) == 4 and not app.get("page_link")
    boxes[0].check().run()
    boxes = [c for c in app.checkbox if c.label == "not evidence"]
    boxes[2].check().run()
    shown = [m.value.split("**filter f")[1].split("**")[0] for m in app.markdown if m.value.startswith("**filter f")]
    [link] = app.get("page_link")
    assert link.proto.page.endswith("revise") or "revise" in link.proto.page
    assert link.proto.label == f"Revise the model against f{shown[0]}, f{shown[2]}"
    assert f"filters={shown[0]}%2C{shown[2]}" in link.proto.query_string or f"filters={shown[0]},{shown[2]}" in link.proto.query_string
    assert "declare=filters" in link.proto.query_string
