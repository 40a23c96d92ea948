"""The Revise page: a box drawn on the picker becomes a region, the page offers what a person needs
to launch a fix, and a finished run shows its verdict against the control and the revised model."""

from __future__ import annotations

import pytest

from cfdebug.revise import Region
from cfdebug.ui.revise import box_region


@pytest.mark.parametrize(
    "selection, expected",
    [
        ({"box": [{"x": [0.6, 6.4], "y": [0.7, 6.2]}]}, Region(1, 1, 7, 7)),  # pixel centres 1..6 inside the box
        ({"box": [{"x": [6.4, 0.6], "y": [6.2, 0.7]}]}, Region(1, 1, 7, 7)),  # dragged the other way
        ({"box": [{"x": [-3.0, 40.0], "y": [-1.0, 2.2]}]}, Region(0, 0, 32, 3)),  # clipped to the image
        ({"box": [{"x": [2.6, 2.9], "y": [1.0, 5.0]}]}, None),  # no pixel centre inside
        ({"box": [], "points": [{"x": 3, "y": 4}, {"x": 5, "y": 9}, {"x": 4, "y": 6}]}, Region(3, 4, 6, 10)),
        ({}, None),
        (None, None),
    ],
)
def test_a_box_on_the_picker_becomes_the_pixels_it_covers(selection, expected):
    assert box_region(selection, 32) == expected


@pytest.mark.slow  # the CFE fit and the Grad-CAM behind the proposal, on a fresh session workdir
def test_the_page_proposes_a_region_and_offers_every_kind_of_declaration(app):
    app.run()
    app.switch_page("views/revise.py").run()
    assert not app.exception, [e.value for e in app.exception]
    labels = [b.label for b in app.button]
    assert "Use the proposed region" in labels
    assert any(label.startswith("Launch region-counterfactual on region") for label in labels)
    region = app.text_input[0].value
    assert len(region.split(",")) == 4  # the proposal, in the text field
    app.text_input[0].set_value("1,1,7,7").run()
    assert app.query_params["region"] in (["1,1,7,7"], "1,1,7,7")
    assert any(label == "Launch region-counterfactual on region 1,1,7,7" for label in (b.label for b in app.button))
    app.text_input[0].set_value("1,1,70,7").run()  # outside the 32 px input: said, and nothing launches from it
    assert any("inside" in e.value for e in app.error)
    assert app.text_input[0].value == "1,1,70,7"  # kept as typed, with its error; the page settles (no rerun loop)
    app.run()  # and a plain rerun changes nothing
    assert app.text_input[0].value == "1,1,70,7" and any("inside" in e.value for e in app.error)


def test_launch_starts_the_declared_run_for_every_kind(app, monkeypatch):
    """Launch writes the spec a background run parses: the region (a Region from the page), the
    ticked filters, the appearance; nothing fails between the button and the run."""
    import cfdebug.ui.revise as rui
    from cfdebug.jobs import _parse_revise_spec

    started = []
    monkeypatch.setattr(rui, "start_run", lambda ws, kind, spec: started.append(spec) or f"revise-test-{len(started)}")
    app.query_params.update({"region": "1,1,7,7", "declare": "region"})
    app.run()
    app.switch_page("views/revise.py").run()
    [b for b in app.button if b.label == "Launch region-counterfactual on region 1,1,7,7"][0].click().run()
    assert not app.exception, [e.value for e in app.exception]
    app.query_params.update({"declare": "filters", "filters": "3,5"})
    app.run()
    [b for b in app.button if b.label == "Launch filters"][0].click().run()
    assert not app.exception, [e.value for e in app.exception]
    app.query_params["declare"] = "appearance"
    app.run()
    assert any("also re-evaluated on the region 1,1,7,7" in c.value for c in app.caption)
    [b for b in app.button if b.label == "Launch appearance"][0].click().run()
    assert not app.exception, [e.value for e in app.exception]
    declared = [spec["declaration"] for spec in started]
    assert declared == [{"method": "region-counterfactual", "region": [1, 1, 7, 7], "filters": []},
                        {"method": "filters", "region": [1, 1, 7, 7], "filters": [3, 5]},  # kept for re-evaluation
                        {"method": "appearance", "region": [1, 1, 7, 7], "filters": []}], declared
    assert all(spec["seeds"] == [0, 1, 2] for spec in started) and started[0]["revise"]["fill"] == "auto"
    for spec in started:
        _parse_revise_spec(spec)  # what the background run reads back


def test_a_read_only_visitor_cannot_launch(app, monkeypatch):
    monkeypatch.setenv("CFDEBUG_READ_ONLY", "1")
    app.run()
    app.switch_page("views/revise.py").run()
    assert not app.exception, [e.value for e in app.exception]
    assert not [b for b in app.button if b.label.startswith("Launch")]
    assert any("read-only" in i.value for i in app.info)


@pytest.mark.slow
def test_a_finished_run_shows_the_verdict_against_the_control_and_the_revised_model(app, demo_workspace, workdir):
    from cfdebug.config import ReviseConfig
    from cfdebug.jobs import revise_spec, run_revise_job

    spec = revise_spec(demo_workspace.config, ReviseConfig(epochs=1, fill="colour"),
                       {"method": "region-counterfactual", "region": [1, 1, 7, 7], "filters": []}, [0])
    result = run_revise_job(spec)
    app.query_params["run"] = result["run_id"]
    app.run()
    app.switch_page("views/revise.py").run()
    assert not app.exception, [e.value for e in app.exception]
    text = " ".join(m.value for m in app.markdown)
    assert "region-counterfactual" in text and "CE control" in text and "test accuracy" in text
    assert any("as launched" in c.value for c in app.caption)  # the fill was given, not chosen
    assert [b for b in app.button if b.label == "Use the revised model as the workspace model"]
    runs = app.dataframe[0].value  # the runs table: what each run declared, no empty cell
    row = runs.loc[runs["run"] == result["run_id"]].iloc[0]
    assert row["region"] == "1,1,7,7" and row["filters"] == "—" and row["seeds"] == "seed 0"
    assert "indicative: one seed" in text  # one seed: the verdict says it is a hint
    summary = [d.value for d in app.dataframe if "best_epoch" in d.value.columns][0]  # base, control, method: a dash where the base model has no seed or epoch
    assert list(summary["model"]) == ["base", "control", "method"] and not summary.isna().any().any()
    assert summary.loc[0, "seed"] == "—" and summary.loc[1, "seed"] == "0" and summary.loc[1, "best_epoch"] == "1"
    assert len(summary.loc[1, "test_acc"].split(".")[1]) == 4  # scores to 4 decimals, not float noise
