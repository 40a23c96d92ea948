"""The command line, in-process (``cli.main``) on the session's cached demo model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cfdebug.cli import main
from cfdebug.models import DemoCNN


@pytest.fixture
def run(workdir, demo_workspace, capsys):
    """``run(*argv) -> (rc, stdout, stderr)`` with the session workdir (the demo model is reused)."""

    def _run(*argv, workdir_arg=True):
        argv = list(argv)
        if workdir_arg:  # defaults first, so that a later option in ``argv`` wins
            argv[1:1] = ["--workdir", str(workdir), "--device", "cpu", "--quiet"]
        capsys.readouterr()
        rc = main(argv)
        out, err = capsys.readouterr()
        return rc, out, err

    return _run


def _one_line_error(rc: int, err: str, *needles: str) -> str:
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.slow
def test_train_prints_accuracies(run):
    # `train` trains fresh (the session's demo model is the shipped asset); one epoch keeps it cheap
    rc, out, err = run("train", "--epochs", "1")
    assert rc == 0, err
    line = next(line for line in out.splitlines() if line.startswith("accuracy:"))
    for split in ("train", "val", "test"):
        assert f"{split} " in line
    assert "%" in line
    rc, out, err = run("train", "--epochs", "1")
    assert rc == 0 and "cached" in out, err  # the same model, not retrained


def test_train_out_copies_weights(run, tmp_path):
    out_path = tmp_path / "w" / "demo.pt"
    rc, out, err = run("train", "--epochs", "1", "--out", str(out_path))
    assert rc == 0, err
    state = torch.load(out_path, weights_only=True)
    DemoCNN(10).load_state_dict(state)


def test_extract_json_and_cache_hit(run, tmp_path):
    out_json = tmp_path / "report.json"
    rc, out, err = run("extract", "--splits", "val,test", "--json", str(out_json))
    assert rc == 0, err
    report = json.loads(out_json.read_text())
    assert report["model"] == "demo-cnn" and report["layer"] == "features.19"
    for split in ("val", "test"):
        r = report["splits"][split]
        assert r["channels"] == 64
        assert r["n"] > 0 and 0.0 <= r["accuracy"] <= 1.0
        assert set(r["per_class_recall"]) == {str(d) for d in range(10)}
        assert Path(r["artifact"]).is_dir()
    assert report["splits"]["val"]["n"] + report["splits"]["test"]["n"] < 1797
    assert f"N={report['splits']['val']['n']} C=64" in out

    rc, out, err = run("extract", "--splits", "val", "--json", str(out_json))
    assert rc == 0, err
    assert "cache hit" in out
    again = json.loads(out_json.read_text())
    assert again["splits"]["val"]["cache_hit"] is True
    assert again["splits"]["val"]["accuracy"] == report["splits"]["val"]["accuracy"]


def test_extract_unknown_split(run):
    _one_line_error(*run("extract", "--splits", "val,bogus")[::2], "bogus")


def test_export_demo(run, tmp_path):
    target = tmp_path / "exported"
    rc, out, err = run("export-demo", str(target), "--bias", "0.5", workdir_arg=False)
    assert rc == 0, err
    counts = {s: len(list((target / s).glob("*/*.png"))) for s in ("train", "val", "test")}
    assert sum(counts.values()) == 1797
    for split, n in counts.items():
        assert f"{split} {n}" in out
    assert sorted(p.name for p in (target / "train").iterdir()) == [str(d) for d in range(10)]
    # into a non-empty folder: refused, nothing touched
    rc, out, err = run("export-demo", str(target), workdir_arg=False)
    _one_line_error(rc, err, str(target))
    assert sum(len(list((target / s).glob("*/*.png"))) for s in counts) == 1797


@pytest.fixture
def mismatched_checkpoint(tmp_path):
    path = tmp_path / "three-classes.pt"
    torch.save(DemoCNN(num_classes=3).state_dict(), path)
    return path


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["extract", "--data", "/nonexistent/cfdebug-data"], ["/nonexistent/cfdebug-data", "does not exist"]),
        (["extract", "--model", "resnet-18", "--weights", "{ckpt}"], ["resnet-18", "resnet18"]),
        (["extract", "--weights", "{ckpt}"], ["classifier.weight", "(3, 64)", "(10, 64)"]),
        (["extract", "--device", "bogus"], ["--device", "bogus"]),
        (["extract", "--batch-size", "0"], ["--batch-size"]),
        (["extract", "--input-size", "2"], ["--input-size"]),
        (["extract", "--layer", "features.99"], ["features.99"]),
        (["train", "--epochs", "0"], ["--epochs"]),
    ],
    ids=["missing-data", "unknown-model", "mismatched-weights", "bad-device", "batch-size-0", "input-size", "bad-layer", "epochs-0"],
)
def test_user_errors_exit_2_with_one_line(run, mismatched_checkpoint, argv, needles):
    argv = [a.replace("{ckpt}", str(mismatched_checkpoint)) for a in argv]
    rc, out, err = run(*argv)
    _one_line_error(rc, err, *needles)


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="default")
    env.pop("CFDEBUG_HOME", None)
    return subprocess.run([sys.executable, "-m", "cfdebug", *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_subprocess_missing_data_exit_2(tmp_path):
    proc = _cli("extract", "--data", "/nonexistent", "--workdir", str(tmp_path / "home"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "/nonexistent" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stdout == ""


def test_unknown_model_without_weights_is_one_line_error(run, recwarn):
    # Without --weights a torchvision model would get random weights (with a warning); an unknown
    # name must fail before that warning, so stderr holds just the error line.
    rc, out, err = run("extract", "--model", "resnet-18")
    # the warning is either recorded by pytest or printed by the CLI's own warning printer
    assert [str(w.message) for w in recwarn] == []
    _one_line_error(rc, err, "resnet-18", "resnet18")


@pytest.mark.parametrize("command", [None, "train", "extract", "detect", "treat", "xcr", "report", "runs", "export-demo", "models", "bench"])
def test_every_help_text_renders(command, capsys):
    from cfdebug.cli import main

    with pytest.raises(SystemExit) as exc:
        main(([command] if command else []) + ["--help"])
    assert exc.value.code == 0
    assert "usage: python -m cfdebug" in capsys.readouterr().out


def test_report_refuses_a_markdown_file_without_markers_before_any_work(tmp_path, capsys):
    from cfdebug.cli import main

    doc = tmp_path / "RESULTS.md"
    doc.write_text("# results\n")
    rc = main(["report", "--workdir", str(tmp_path / "wd"), "--markdown", str(doc), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "<!-- biased-digits:start -->" in err
    assert not (tmp_path / "wd").exists() and doc.read_text() == "# results\n"  # nothing computed, nothing written
    assert main(["report", "--claims", "detection,magic", "--workdir", str(tmp_path / "wd"), "--quiet"]) == 2
    assert "claims" in capsys.readouterr().err


def test_marked_sections_are_replaced_in_place():
    from cfdebug.claims import replace_marked_section

    text = "a\n<!-- s:start -->\nold\n<!-- s:end -->\nb\n"
    assert replace_marked_section(text, "s", "new\nrows") == "a\n<!-- s:start -->\nnew\nrows\n<!-- s:end -->\nb\n"


def test_bench_cfe_refuses_a_limit_below_one(run):
    _one_line_error(*run("bench", "cfe", "--limit", "0")[::2], "Expected a positive `--limit`, but got 0")


@pytest.mark.slow
def test_bench_cfe_runs_on_fixed_threads_and_restores_them(run, tmp_path):
    """`bench cfe` prints both same-run ratios; `--threads` holds for the run and is undone after."""
    before = torch.get_num_threads()
    out_json = tmp_path / "bench.json"
    rc, out, err = run("bench", "cfe", "--repeats", "1", "--n", "8", "--threads", "1", "--limit", "64", "--json", str(out_json))
    assert rc == 0, err
    assert ": 64 training images" in out  # --limit: the first 64, for both sides of the ratio
    assert "1 threads" in out and "(CFE fit + predict) / extraction pass" in out and "target <= 1:" in out
    assert "Grad-CAM on 8 images" in out
    result = json.loads(out_json.read_text())
    assert result["head"] == "pooled" and result["cfe_target"] == 1.0 and result["gradcam_speedup"] > 0
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------------------------- field names → flags
def test_for_cli_maps_field_names_to_flags():
    from cfdebug.cli import flag_for, for_cli, rename_fields

    assert flag_for("data.input_size") == "--input-size" and flag_for("train.batch_size") is None
    assert for_cli("Expected `data.val_fraction` to be in [0, 1), but got -3.") == "Expected `--val-fraction` to be in [0, 1), but got -3."
    assert for_cli("Expected `device` to be auto, cpu, cuda or cuda:N, but got 'tpu'.") == "Expected `--device` to be auto, cpu, cuda or cuda:N, but got 'tpu'."
    untouched = "Expected `train.batch_size` to be a positive integer, but got 0 (`k` too)."
    assert for_cli(untouched) == untouched
    assert rename_fields("`data.bias` and `model.name`", {"data.bias": "Shortcut strength"}) == "`Shortcut strength` and `model.name`"


def test_every_mapped_flag_exists_on_the_cli():
    from cfdebug.cli import CLI_FLAGS, build_parser
    from cfdebug.config import WorkspaceConfig

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    extract = sub.choices["extract"]
    assert set(CLI_FLAGS.values()) <= set(extract._option_string_actions)
    # Each mapped field is a real field of the workspace config.
    for name in CLI_FLAGS:
        obj = WorkspaceConfig()
        for part in name.split("."):
            assert hasattr(obj, part), name
            obj = getattr(obj, part)


def test_importing_the_cli_does_not_import_torch():
    """The dashboard imports the flag map (cfdebug.ui.workspace): the module loads torch only when a command runs."""
    code = "import sys, cfdebug.cli; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
