"""Shared fixtures: RNG state restored around each test, one trained demo workspace per session."""

from __future__ import annotations

import os
import random
import subprocess
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_rng_state():
    """Tests may seed freely; the global RNG state is put back afterwards."""
    py, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(py)
    np.random.set_state(np_state)
    torch.set_rng_state(torch_state)


@pytest.fixture(autouse=True)
def _dashboard_computes_inline(monkeypatch):
    """AppTest has no fragment timers to poll a background run with, so pages under test compute
    missing artifacts in-process (tests/test_dashboard_loading.py unsets it to test the runs)."""
    monkeypatch.setenv("CFDEBUG_DASHBOARD_INLINE", "1")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """One artifact cache for the whole session, so the demo model trains once."""
    return tmp_path_factory.mktemp("cfdebug-home")


@pytest.fixture(scope="session")
def demo_workspace(workdir):
    """The demo CNN trained on Biased Digits (cached in the session workdir)."""
    from cfdebug.config import WorkspaceConfig
    from cfdebug.workspace import Workspace

    return Workspace(WorkspaceConfig(workdir=str(workdir), device="cpu"))


@pytest.fixture
def app(demo_workspace, workdir, monkeypatch):
    """The whole dashboard (app.py) under AppTest, on the session's demo workdir."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CFDEBUG_HOME", str(workdir))
    return AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=180)


def pytest_addoption(parser):
    parser.addoption("--screenshots", default=None, help="also copy the browser tests' screenshots into this folder")


@contextmanager
def tmpfs(folder: Path, size: str):
    """A tmpfs of ``size`` (``"2m"``) mounted at ``folder`` (created) for the block, unmounted after;
    the test is skipped where one cannot be mounted (not root, no mount)."""
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
