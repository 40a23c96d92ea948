"""`python -m cfdebug treat`, `xcr` and `runs`: Table 2/3 output, JSON keys, resume, bad input
checked before a run exists, `--config` running the run its run.json names."""

from __future__ import annotations

import json

import pytest

from cfdebug.cli import main
from cfdebug.runs import RunRegistry


@pytest.mark.slow
def test_treat_sweep_prints_tables_and_writes_json(demo_workspace, workdir, tmp_path, capsys):
    out = tmp_path / "treat.json"
    rc = main(["treat", "--workdir", str(workdir), "--treat-epochs", "1", "--lambda1", "1e-3", "--lambda2", "2e-5,1e-4",
               "--seeds", "0,1", "--json", str(out), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Fine-tuned (control)" in text and "Table 3" in text and "flagged-set churn" in text
    result = json.loads(out.read_text())
    assert {"base", "control", "runs", "table3", "table2", "flagged_churn"} <= set(result)
    assert 0 <= result["flagged_churn"]["flagged_errors_fixed"] <= result["flagged_churn"]["flagged_errors_before"]
    assert len(result["runs"]) == 4 and len(result["control"]) == 2
    for run in result["runs"]:
        assert {"lambda1", "lambda2", "seed", "train_acc", "val_acc", "test_acc", "per_class_recall"} <= set(run)
        assert 0.0 <= run["test_acc"] <= 1.0 and len(run["per_class_recall"]) == 10
    record = RunRegistry(workdir).get(result["run_id"])
    assert record.status == "done"

    # resuming a finished run reads every run back from its checkpoint: same numbers
    again = tmp_path / "again.json"
    assert main(["treat", "--workdir", str(workdir), "--resume", result["run_id"], "--json", str(again), "--quiet"]) == 0
    resumed = json.loads(again.read_text())
    assert [r["test_acc"] for r in resumed["runs"]] == [r["test_acc"] for r in result["runs"]]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--lambda1", "3"], "in [0, 1]"),
        (["--lambda2=-1e-3"], "in [0, 1]"),
        (["--treat-epochs", "0"], "epochs"),
        (["--lambda1", "abc"], "comma-separated numbers"),
        (["--resume", "treat-nope"], "python -m cfdebug runs"),
    ],
)
def test_treat_bad_input_exits_2(demo_workspace, workdir, argv, needle, capsys):
    assert main(["treat", "--workdir", str(workdir), "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and needle in err and "Traceback" not in err


@pytest.mark.parametrize("argv, flag", [(["--k", "100000"], "`--k`"), (["--patch-size", "3"], "`--patch-size`"),
                                        (["--cifar10c", "MISSING"], "`--cifar10c`"), (["--seeds", "x"], "`--seeds`")])
def test_xcr_bad_options_exit_2_before_a_run_exists(tmp_path, argv, flag, capsys):
    home = tmp_path / "home"
    argv = [a.replace("MISSING", str(tmp_path / "no-such-folder")) for a in argv]
    assert main(["xcr", "--workdir", str(home), "--quiet", *argv]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and flag in lines[0], lines
    assert RunRegistry(home).list() == []  # no failed run with a resume hint left behind


@pytest.mark.parametrize("kind", ["treat", "xcr"])
def test_config_runs_the_run_its_run_json_names(tmp_path, kind, capsys):
    """`KIND --config run.json` (what a background run executes) runs the stored run, registering
    no second one; here its options are wrong, so it fails with the message and no resume hint."""
    from cfdebug.config import TreatmentSchedule, WorkspaceConfig, XCRConfig
    from cfdebug.jobs import treat_spec, xcr_spec
    from cfdebug.xcr.selector import SelectorConfig

    home = tmp_path / "home"
    ws = WorkspaceConfig(workdir=str(home), device="cpu")
    spec = treat_spec(ws, TreatmentSchedule(), [1e-3], [2e-5], [0]) if kind == "treat" else xcr_spec(ws, XCRConfig.demo(selector=SelectorConfig.demo(k=100000)))
    if kind == "treat":
        del spec["lambdas1"]  # a damaged run.json
    registry = RunRegistry(home)
    record = registry.create(kind, spec)
    assert main([kind, "--workdir", str(home), "--config", str(record.config_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    runs = registry.list()
    assert [r.run_id for r in runs] == [record.run_id] and runs[0].status == "failed"
    assert "resume" not in runs[0].error and runs[0].error.split("`")[-1] in err  # the same message (the CLI names its flags)


def test_runs_lists_and_cancel_unknown(workdir, capsys):
    assert main(["runs", "--workdir", str(workdir)]) == 0
    assert main(["runs", "--workdir", str(workdir), "--cancel", "nope"]) == 2


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process(demo_workspace, workdir, tmp_path):
    """`torchrun --nproc_per_node=2 -m cfdebug treat` (gloo, CPU) ends with the single-process accuracies."""
    import os
    import subprocess
    import sys

    common = ["treat", "--workdir", str(workdir), "--treat-epochs", "2", "--treat-lr", "1e-2", "--quiet"]
    single = tmp_path / "single.json"
    assert main([*common, "--json", str(single)]) == 0
    ddp = tmp_path / "ddp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cfdebug", *common, "--json", str(ddp)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads(single.read_text()), json.loads(ddp.read_text())
    assert b["world_size"] == 2 and a["world_size"] == 1
    n_test = len(demo_workspace.data.splits["test"])
    for key in ("control", "runs"):
        for ra, rb in zip(a[key], b[key]):
            # Same global batches, dropout masks and batch-norm statistics: at most a rounding-level
            # tie may flip, so allow 2 test images.
            assert abs(ra["test_acc"] - rb["test_acc"]) * n_test <= 2 + 1e-9
            assert abs(ra["val_acc"] - rb["val_acc"]) <= 2 / len(demo_workspace.data.splits["val"]) + 1e-9
