"""The public API (``cfdebug.__all__``) and the README's "Use it from Python" script."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cfdebug

ROOT = Path(__file__).resolve().parents[1]


def test_every_public_name_resolves():
    for name in cfdebug.__all__:
        assert getattr(cfdebug, name) is not None, name
    for name in ("Workspace", "WorkspaceConfig", "run_detection", "treatment_sweep", "run_treat_job", "run_xcr_report", "run_xcr_job",
                 "run_claims", "run_prepare_job", "TreatmentSchedule", "CfdebugError"):
        assert name in cfdebug.__all__


def test_the_public_names_are_the_library_functions():
    from cfdebug import claims, jobs, treatment

    assert cfdebug.run_claims is claims.run_claims and cfdebug.run_prepare_job is jobs.run_prepare_job
    assert cfdebug.treatment_sweep is treatment.treatment_sweep
    assert set(cfdebug.__all__) <= set(dir(cfdebug))
    with pytest.raises(AttributeError, match="no attribute 'run_everything'"):
        cfdebug.run_everything


def test_the_xcr_package_exports_its_api_explicitly():
    import cfdebug.xcr as xcr

    for name in xcr.__all__:
        assert getattr(xcr, name) is not None, name
    # internals stay in their modules: the networks, losses and cache keys are not the package's API
    for name in ("PatchSelector", "Approximator", "selector_loss", "masks_key", "counterfactual_batches", "check_k"):
        assert name not in xcr.__all__


def test_import_cfdebug_does_not_import_torch():
    code = "import sys, cfdebug, cfdebug.jobs, cfdebug.config, cfdebug.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def readme_script() -> str:
    """The Python block under the README's "Use it from Python" heading."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Use it from Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_script_runs_on_a_tiny_tree(tmp_path):
    """The script as printed, in a folder holding a small demo tree and resnet18 weights trained on it."""
    from cfdebug.cli import main
    from cfdebug.data import export_imagefolder

    export_imagefolder(tmp_path / "full")
    for split, keep in (("train", 10), ("val", 3), ("test", 12)):  # per class: a tiny tree
        for folder in (tmp_path / "full" / split).iterdir():
            target = tmp_path / "digits" / split / folder.name
            target.mkdir(parents=True)
            for image in sorted(folder.iterdir())[:keep]:
                image.rename(target / image.name)
    home = tmp_path / "home"
    assert main(["train", "--model", "resnet18", "--data", str(tmp_path / "digits"), "--input-size", "32", "--mean", "0.5,0.5,0.5",
                 "--std", "0.25,0.25,0.25", "--epochs", "1", "--device", "cpu", "--workdir", str(home), "--quiet",
                 "--out", str(tmp_path / "resnet18_digits.pt")]) == 0
    env = dict(os.environ, PYTHONPATH=str(ROOT), CFDEBUG_HOME=str(home))
    out = subprocess.run([sys.executable, "-c", readme_script()], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert re.fullmatch(r"\d+ errors in 120 test images", lines[0]), lines
    assert lines[1].split() == ["score", "AUROC", "AUPR-Err"]
    assert [line.split()[0] for line in lines[2:]] == ["mc_agreement", "msp", "combined"]
