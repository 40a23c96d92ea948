"""cfdebug.jobs: the background-run entry points and the specs they read."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cfdebug.config import TreatmentSchedule, WorkspaceConfig, XCRConfig, config_dict
from cfdebug.errors import CfdebugError
from cfdebug.jobs import prediction_changes, read_run_spec, run_treat_job, run_xcr_job, treat_spec, xcr_spec
from cfdebug.runs import RunRegistry


def _report(true, predicted):
    return {"images": [{"id": f"i{n}", "true": t, "predicted": p} for n, (t, p) in enumerate(zip(true, predicted))]}


def test_prediction_changes_against_a_naive_loop():
    rng = np.random.default_rng(0)
    k, n = 4, 50
    labels, base, treated = (rng.integers(0, k, n) for _ in range(3))
    out = prediction_changes(_report(labels, base), _report(labels, treated), k)
    delta = np.zeros((k, k), int)
    for y, b, a in zip(labels, base, treated):
        delta[y, a] += 1
        delta[y, b] -= 1
    assert out["confusion_delta"] == delta.tolist()
    assert out["fixed"] == [i for i in range(n) if base[i] != labels[i] and treated[i] == labels[i]]
    assert out["broken"] == [i for i in range(n) if base[i] == labels[i] and treated[i] != labels[i]]
    assert out["test_predictions"] == treated.tolist() and out["base_test_predictions"] == base.tolist()
    json.dumps(out)  # stored in the run's result as is


def test_prediction_changes_refuses_other_images():
    with pytest.raises(CfdebugError, match="image ids differ"):
        prediction_changes(_report([0], [0]), {"images": [{"id": "other", "true": 0, "predicted": 0}]}, 2)


def test_specs_round_trip_through_run_json(tmp_path):
    ws = WorkspaceConfig(workdir=str(tmp_path))
    spec = treat_spec(ws, TreatmentSchedule(), [1e-3, 1e-2], [2e-5], [0, 1])
    assert spec == {"workspace": config_dict(ws), "treatment": config_dict(TreatmentSchedule()), "lambdas1": [1e-3, 1e-2], "lambdas2": [2e-5], "seeds": [0, 1]}
    record = RunRegistry(tmp_path).create("treat", spec)
    assert read_run_spec(record.config_path) == (spec, record.run_id)
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(xcr_spec(ws, XCRConfig())))
    assert read_run_spec(bare) == (json.loads(bare.read_text()), None)
    with pytest.raises(CfdebugError, match="at least one value"):
        treat_spec(ws, TreatmentSchedule(), [], [2e-5], [0])


@pytest.mark.parametrize("text,needle", [(None, "does not exist"), ("{not json", "readable JSON"), ("[1, 2]", "JSON object")])
def test_read_run_spec_refuses_bad_files(tmp_path, text, needle):
    path = tmp_path / "run.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(CfdebugError, match=needle):
        read_run_spec(path)


def test_a_treat_job_with_a_bad_spec_fails_its_run(tmp_path):
    registry = RunRegistry(tmp_path)
    run_id = registry.create("treat", {"workspace": {}}).run_id
    with pytest.raises(CfdebugError, match="not a treatment config"):
        run_treat_job({"workspace": {}}, registry=registry, run_id=run_id)
    record = registry.get(run_id)
    assert record.status == "failed" and "not a treatment config" in record.error


def test_an_xcr_job_needs_workspace_and_xcr():
    with pytest.raises(CfdebugError, match="`workspace` and `xcr`"):
        run_xcr_job({"workspace": {}})


@pytest.mark.slow
def test_xcr_job_runs_a_registered_run_with_progress_checkpoints_and_result(demo_workspace, workdir):
    from cfdebug.xcr.selector import SelectorConfig

    registry = RunRegistry(workdir)
    config = XCRConfig.demo(selector=SelectorConfig.demo(k=32, beta=0.001, epochs=1), epochs=1, table1_ks=(), corruptions=(), severities=(), batch_size=128)
    spec = xcr_spec(demo_workspace.config, config)
    record = registry.create("xcr", spec)
    result = run_xcr_job(spec, run_id=record.run_id)
    record = registry.get(record.run_id)
    assert record.status == "done", record.error
    assert record.result["table2"] == result["table2"] and result["table1"] == [] and result["per_corruption"] == []
    assert any("fraction" in row for row in registry.progress(record.run_id))
    assert (record.run_dir / "xcr-seed0" / "checkpoint.pt").is_file()
    again = run_xcr_job(spec)  # no run: just the report, from the cache now
    assert again["cache_hit"] is True and again["table2"] == result["table2"]
