"""Tests for cfdebug.runs: the SQLite run registry and background runs.

Child processes import cfdebug from this checkout (PYTHONPATH is set to the repository root),
so they exercise the same code as the dashboard's background runs.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import tmpfs

from cfdebug.errors import CfdebugError
from cfdebug.runs import STATUSES, RunRecord, RunRegistry, cancel, launch, start_background_run
from cfdebug.procs import pid_alive

REPO_ROOT = Path(__file__).resolve().parents[1]
CHILD_ENV = {"PYTHONPATH": str(REPO_ROOT)}
TIMEOUT_S = 60.0


def _strict_json(text: str):
    """``text`` parsed as RFC 8259 JSON: a NaN/Infinity literal raises, as in other tools' parsers."""

    def refuse(literal):
        raise ValueError(f"not JSON: {literal}")

    return json.loads(text, parse_constant=refuse)


def _wait_for(predicate, timeout: float = TIMEOUT_S, interval: float = 0.05):
    """Poll ``predicate`` until it returns a truthy value (returned) or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def _wait_finished(reg: RunRegistry, run_id: str) -> RunRecord:
    return _wait_for(lambda: (rec := reg.get(run_id)).finished and rec)


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped (so nothing lives there now)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _child_script(body: str, workdir: Path, run_id: str) -> str:
    header = (
        "import os, sys, time\n"
        "from cfdebug.runs import RunRegistry, run_context, check_cancel\n"
        f"reg = RunRegistry({str(workdir)!r})\n"
        f"run_id = {run_id!r}\n"
    )
    return header + textwrap.dedent(body)


# ---------------------------------------------------------------------- registry round trip
def test_round_trip(tmp_path):
    reg = RunRegistry(tmp_path)
    config = {"lr": 0.01, "epochs": 2, "lambdas": [1.0, 0.5], "name": "demo"}
    rec = reg.create("treat", config, run_id="treat-a")
    assert rec.status == "queued" and rec.kind == "treat" and rec.config == config
    assert rec.pid is None and rec.progress is None and rec.result is None and rec.error is None
    assert rec.run_dir == tmp_path / "runs" / "treat-a"
    assert json.loads((rec.run_dir / "run.json").read_text()) == {
        "kind": "treat",
        "run_id": "treat-a",
        "config": config,
    }
    assert not list(rec.run_dir.glob("*.tmp"))  # the atomic write left no temp file
    assert (tmp_path / "runs.db").is_file()
    with sqlite3.connect(tmp_path / "runs.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    time.sleep(0.01)  # distinct creation times for the ordering check
    other = reg.create("xcr", {"k": 3})
    assert other.run_id.startswith("xcr-") and other.status == "queued"
    assert [r.run_id for r in reg.list()] == [other.run_id, "treat-a"]  # newest first
    assert [r.run_id for r in reg.list(kind="treat")] == ["treat-a"]
    assert reg.list(kind="nothing") == []

    reg.set_status("treat-a", "running", pid=os.getpid())
    rows = [
        {"epoch": 0, "step": 1, "loss": 2.5, "val_acc": 0.1},
        {"epoch": 0, "step": 2, "loss": float("nan"), "val_acc": float("inf")},
        {"epoch": 1, "step": 3, "loss": 1.5, "val_acc": -float("inf")},
    ]
    for row in rows:
        reg.log_progress("treat-a", row)
    got = reg.progress("treat-a")
    assert len(got) == 3 and got[0] == rows[0] and got[2] == rows[2]
    assert math.isnan(got[1]["loss"]) and got[1]["val_acc"] == float("inf")
    lines = (rec.run_dir / "progress.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0]) == rows[0]
    # The run files are valid JSON for other tools: a non-finite float is null there (the database keeps it).
    assert _strict_json(lines[1]) == {"epoch": 0, "step": 2, "loss": None, "val_acc": None}
    rec = reg.get("treat-a")
    assert rec.status == "running" and rec.pid == os.getpid() and rec.progress == rows[2]
    assert reg.progress(other.run_id) == []

    reg.set_result("treat-a", {"val_acc": 0.93, "ece": float("nan")})
    rec = reg.get("treat-a")
    assert rec.status == "done" and rec.finished
    assert rec.result["val_acc"] == 0.93 and math.isnan(rec.result["ece"])
    assert _strict_json((rec.run_dir / "result.json").read_text()) == {"val_acc": 0.93, "ece": None}

    reg.set_status(other.run_id, "failed", error="boom")
    assert reg.get(other.run_id).error == "boom"
    assert not reg.cancel_requested(other.run_id)
    reg.request_cancel(other.run_id)
    assert reg.cancel_requested(other.run_id) and reg.get(other.run_id).cancel_requested

    # A second registry object (as another thread/process would make) sees the same state.
    assert RunRegistry(tmp_path).get("treat-a").result["val_acc"] == 0.93


def test_numpy_like_values_and_bad_values(tmp_path):
    class Scalar:  # stands in for a NumPy scalar / 0-d tensor
        def item(self):
            return 0.25

    reg = RunRegistry(tmp_path)
    reg.create("treat", {"path": tmp_path / "x"}, run_id="r1")
    assert reg.get("r1").config == {"path": str(tmp_path / "x")}
    reg.log_progress("r1", {"loss": Scalar()})
    assert reg.progress("r1") == [{"loss": 0.25}]
    with pytest.raises(CfdebugError, match="JSON"):
        reg.log_progress("r1", {"loss": object()})
    assert reg.progress("r1") == [{"loss": 0.25}]


def test_unknown_id_names_close_match(tmp_path):
    reg = RunRegistry(tmp_path)
    reg.create("treat", {}, run_id="treat-20240101-abc123")
    reg.create("treat", {}, run_id="zzz")
    with pytest.raises(CfdebugError) as info:
        reg.get("treat-20240101-abc124")
    message = str(info.value)
    assert "treat-20240101-abc123" in message and "zzz" not in message
    assert "treat-20240101-abc124" in message and "python -m cfdebug runs" in message
    for call in (
        lambda: reg.progress("nope"),
        lambda: reg.log_progress("nope", {"a": 1}),
        lambda: reg.set_status("nope", "done"),
        lambda: reg.set_result("nope", {}),
        lambda: reg.cancel_requested("nope"),
    ):
        with pytest.raises(CfdebugError, match="no run 'nope'"):
            call()
    assert not (tmp_path / "runs" / "nope").exists()


def test_user_errors(tmp_path):
    reg = RunRegistry(tmp_path)
    reg.create("treat", {"a": 1}, run_id="r1")
    with pytest.raises(CfdebugError, match="one of queued, running, done, failed, cancelled"):
        reg.set_status("r1", "finished")
    assert reg.get("r1").status == "queued"
    with pytest.raises(CfdebugError, match="already exists"):
        reg.create("treat", {"a": 2}, run_id="r1")
    assert json.loads((tmp_path / "runs" / "r1" / "run.json").read_text())["config"] == {"a": 1}
    with pytest.raises(CfdebugError, match="run_id"):
        reg.create("treat", {}, run_id="../escape")
    with pytest.raises(CfdebugError, match="kind"):
        reg.create("", {})
    with pytest.raises(CfdebugError, match="dict"):
        reg.create("treat", [1, 2])
    with pytest.raises(CfdebugError, match="lock_timeout_s"):
        RunRegistry(tmp_path, lock_timeout_s=0)
    assert set(STATUSES) == {"queued", "running", "done", "failed", "cancelled"}


def test_corrupt_db_is_a_user_error(tmp_path):
    (tmp_path / "runs.db").write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(CfdebugError) as info:
        RunRegistry(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "runs.db") in message and "not a valid database" in message
    assert "Move it aside" in message


# ---------------------------------------------------------------------- concurrency
WRITER = """
import sys
from cfdebug.runs import RunRegistry
workdir, name, shared = sys.argv[1], sys.argv[2], sys.argv[3]
reg = RunRegistry(workdir)
for i in range(200):
    reg.log_progress(shared, {"writer": name, "i": i})
    if i % 40 == 0:
        reg.create("treat", {"writer": name, "i": i}, run_id=f"{name}-{i}")
    if i % 50 == 0:
        reg.list()
print("ok", name)
"""


def test_two_processes_write_concurrently(tmp_path):
    reg = RunRegistry(tmp_path)
    reg.create("treat", {}, run_id="shared")
    env = {**os.environ, **CHILD_ENV}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), name, "shared"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    # This process writes at the same time too, like a dashboard would.
    for i in range(50):
        reg.log_progress("shared", {"writer": "main", "i": i})
    outputs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        assert out.startswith("ok")

    rows = reg.progress("shared")
    assert len(rows) == 450
    for name, count in (("a", 200), ("b", 200), ("main", 50)):
        mine = [r["i"] for r in rows if r["writer"] == name]
        assert mine == list(range(count))  # none lost, none duplicated, in order per writer
    lines = (tmp_path / "runs" / "shared" / "progress.jsonl").read_text().splitlines()
    assert sorted(json.dumps(json.loads(x), sort_keys=True) for x in lines) == sorted(
        json.dumps(r, sort_keys=True) for r in rows
    )
    ids = {r.run_id for r in reg.list()}
    assert ids == {"shared"} | {f"{n}-{i}" for n in "ab" for i in range(0, 200, 40)}


def test_threads_share_a_registry(tmp_path):
    # Streamlit runs scripts in threads; one RunRegistry object must be usable from all of them.
    reg = RunRegistry(tmp_path)
    reg.create("treat", {}, run_id="t")
    errors = []

    def work(k):
        try:
            for i in range(30):
                reg.log_progress("t", {"k": k, "i": i})
                reg.get("t")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(reg.progress("t")) == 120


def test_locked_db_makes_writer_wait(tmp_path):
    reg = RunRegistry(tmp_path)
    blocker = sqlite3.connect(tmp_path / "runs.db", isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")  # holds the write lock, as a busy process would
    blocker.execute("UPDATE runs SET updated = updated")
    released = threading.Event()

    def release():
        time.sleep(1.0)
        blocker.execute("COMMIT")
        released.set()

    thread = threading.Thread(target=release)
    thread.start()
    try:
        rec = reg.create("treat", {"x": 1}, run_id="waited")
        assert released.is_set()  # it only got through once the lock was released
        assert rec.status == "queued"
        reg.log_progress("waited", {"step": 1})
        assert reg.progress("waited") == [{"step": 1}]
    finally:
        thread.join()
        blocker.close()


def test_lock_held_too_long_is_a_user_error(tmp_path):
    RunRegistry(tmp_path).create("treat", {}, run_id="r")
    reg = RunRegistry(tmp_path, lock_timeout_s=0.5)
    blocker = sqlite3.connect(tmp_path / "runs.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(CfdebugError, match="is locked by another process; retry"):
            reg.log_progress("r", {"step": 1})
        assert reg.get("r").status == "queued"  # reads still work while a writer holds the lock
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    reg.log_progress("r", {"step": 1})
    assert reg.progress("r") == [{"step": 1}]
    # the failed attempt wrote nothing to the run directory either
    assert (tmp_path / "runs" / "r" / "progress.jsonl").read_text().splitlines() == ['{"step": 1}']


# ---------------------------------------------------------------------- background runs
def test_launch_runs_to_done(tmp_path):
    reg = RunRegistry(tmp_path)
    rec = reg.create("treat", {"steps": 5}, run_id="bg")
    script = _child_script(
        """
        import json
        config = json.load(open(os.path.join(os.environ["CFDEBUG_RUN_DIR"], "run.json")))["config"]
        assert os.environ["CFDEBUG_RUN_ID"] == run_id
        with run_context(reg, run_id):
            for step in range(config["steps"]):
                check_cancel(reg, run_id)
                reg.log_progress(run_id, {"step": step, "loss": 1.0 / (step + 1)})
            print("training finished")
            reg.set_result(run_id, {"val_acc": 0.875})
        """,
        tmp_path,
        "bg",
    )
    pid = launch(reg, "bg", [sys.executable, "-c", script], env=CHILD_ENV)
    assert isinstance(pid, int) and pid > 0
    assert reg.get("bg").status in ("running", "done")  # running from launch, before it reports
    final = _wait_finished(reg, "bg")
    assert final.status == "done", (final.error, rec.log_path.read_text())
    assert final.result == {"val_acc": 0.875} and final.pid == pid
    assert [r["step"] for r in reg.progress("bg")] == [0, 1, 2, 3, 4]
    log = rec.log_path.read_text()
    assert "launch:" in log and "training finished" in log
    _wait_for(lambda: not pid_alive(pid))
    with pytest.raises(CfdebugError, match="already done"):
        launch(reg, "bg", [sys.executable, "-c", "pass"])


def test_launch_of_a_crashing_child_fails_with_message(tmp_path):
    reg = RunRegistry(tmp_path)
    reg.create("treat", {}, run_id="crash")
    script = _child_script(
        """
        with run_context(reg, run_id):
            reg.log_progress(run_id, {"step": 0})
            raise RuntimeError("loss exploded")
        """,
        tmp_path,
        "crash",
    )
    launch(reg, "crash", [sys.executable, "-c", script], env=CHILD_ENV)
    final = _wait_finished(reg, "crash")
    assert final.status == "failed"
    assert "RuntimeError: loss exploded" in final.error and "resume with" in final.error
    assert "Traceback" in final.run_dir.joinpath("log.txt").read_text()


def test_child_that_dies_without_reporting_is_reconciled(tmp_path):
    reg = RunRegistry(tmp_path)
    reg.create("treat", {}, run_id="dies")
    argv = [sys.executable, "-c", "import os; os._exit(3)"]
    launch(reg, "dies", argv)
    final = _wait_finished(reg, "dies")
    assert final.status == "failed"
    assert final.error.startswith("process ended without finishing (killed?); resume with")
    assert "os._exit(3)" in final.error  # the launch command is the resume hint
    # A failed run can be launched again (this is how a crashed run resumes).
    pid = launch(reg, "dies", [sys.executable, "-c", _child_script(
        "with run_context(reg, run_id):\n    reg.set_result(run_id, {'resumed': True})\n", tmp_path, "dies")],
        env=CHILD_ENV)
    final = _wait_finished(reg, "dies")
    assert final.status == "done" and final.result == {"resumed": True} and final.error is None
    assert final.pid == pid
    assert final.run_dir.joinpath("log.txt").read_text().count("launch:") == 2


def test_launch_errors(tmp_path):
    reg = RunRegistry(tmp_path)
    reg.create("treat", {}, run_id="r")
    with pytest.raises(CfdebugError, match="argv"):
        launch(reg, "r", [])
    with pytest.raises(CfdebugError, match="could not start"):
        launch(reg, "r", [str(tmp_path / "no-such-program")])
    assert reg.get("r").status == "failed"
    with pytest.raises(CfdebugError, match="no run 'rr'"):
        launch(reg, "rr", [sys.executable, "-c", "pass"])


def test_cancel_cooperative_child(tmp_path):
    reg = RunRegistry(tmp_path)
    reg.create("treat", {}, run_id="loop")
    script = _child_script(
        """
        with run_context(reg, run_id):
            step = 0
            while True:
                check_cancel(reg, run_id)
                reg.log_progress(run_id, {"step": step})
                step += 1
                time.sleep(0.02)
        """,
        tmp_path,
        "loop",
    )
    pid = launch(reg, "loop", [sys.executable, "-c", script], env=CHILD_ENV)
    _wait_for(lambda: reg.get("loop").progress is not None)  # it is really running
    rec = cancel(reg, "loop")
    assert rec.cancel_requested
    final = _wait_finished(reg, "loop")
    assert final.status == "cancelled", (final.error, final.log_path.read_text())
    _wait_for(lambda: not pid_alive(pid))
    # cancel on a finished run is a no-op
    assert cancel(reg, "loop").status == "cancelled"


def test_cancel_child_that_ignores_the_registry(tmp_path):
    # A child that neither polls nor handles SIGTERM is killed by the signal; reconcile() then
    # marks it cancelled, because the cancel flag says it was asked to stop.
    reg = RunRegistry(tmp_path)
    reg.create("treat", {}, run_id="sleeper")
    pid = launch(reg, "sleeper", [sys.executable, "-c", "import time; time.sleep(120)"])
    assert reg.get("sleeper").status == "running"
    cancel(reg, "sleeper")
    final = _wait_finished(reg, "sleeper")
    assert final.status == "cancelled"
    _wait_for(lambda: not pid_alive(pid))


def test_cancel_queued_run(tmp_path):
    reg = RunRegistry(tmp_path)
    reg.create("treat", {}, run_id="q")
    rec = cancel(reg, "q")
    assert rec.status == "cancelled" and rec.cancel_requested


def test_reconcile_marks_dead_running_run_failed(tmp_path):
    reg = RunRegistry(tmp_path)
    reg.create("treat", {}, run_id="ghost")
    reg.create("treat", {}, run_id="alive")
    dead = _dead_pid()
    assert not pid_alive(dead)
    reg.set_status("ghost", "running", pid=dead)
    reg.set_status("alive", "running", pid=os.getpid())
    assert reg.reconcile() == ["ghost"]
    rec = reg.get("ghost")
    assert rec.status == "failed"
    assert rec.error.startswith("process ended without finishing (killed?); resume with")
    assert "python -m cfdebug treat --config" in rec.error and "--run-id ghost" in rec.error
    assert reg.get("alive").status == "running"
    assert reg.reconcile() == []  # idempotent

    # list() reconciles too
    reg.create("treat", {}, run_id="ghost2")
    reg.set_status("ghost2", "running", pid=_dead_pid())
    assert {r.run_id: r.status for r in reg.list()}["ghost2"] == "failed"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="zombie detection reads /proc")
def test_pid_alive_detects_zombie(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    # Not reaped yet: a zombie still answers os.kill(pid, 0) but must count as dead.
    _wait_for(lambda: not pid_alive(proc.pid))
    proc.wait()
    assert pid_alive(os.getpid())
    assert not pid_alive(None)


# ---------------------------------------------------------------------- the dashboard's launcher
def test_start_background_run_refuses_an_unknown_kind(tmp_path):
    with pytest.raises(CfdebugError, match="`kind` to be one of treat, xcr"):
        start_background_run(tmp_path, "bench", {})


@pytest.mark.parametrize("kind", ["treat", "xcr"])
def test_start_background_run_starts_the_cli_the_same_way_for_each_kind(tmp_path, monkeypatch, kind):
    """From a folder where `cfdebug` is not importable, with no PYTHONPATH: the child still imports
    this checkout, runs `python -m cfdebug KIND --config … --run-id … --workdir … --quiet`, and a spec
    of the wrong shape ends as a failed run naming the problem."""
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.chdir(tmp_path)
    run_id = start_background_run(tmp_path / "wd", kind, {"not": "a spec"})
    reg = RunRegistry(tmp_path / "wd")
    final = _wait_finished(reg, run_id)
    assert final.status == "failed", (final.status, final.log_path.read_text())
    log = final.log_path.read_text()
    assert f"-m cfdebug {kind} --config {final.config_path} --run-id {run_id} --workdir {tmp_path / 'wd'} --quiet" in log
    assert "No module named" not in log
    assert ("not a treatment config" if kind == "treat" else "`workspace` and `xcr`") in (final.error or "") + log


# ---------------------------------------------------------------------- progress rows
def test_progress_row_is_one_shape_and_checks_its_fields():
    from cfdebug.runs import progress_row

    assert progress_row(0.5, "sweep", "epoch 1/2") == {"fraction": 0.5, "stage": "sweep", "message": "epoch 1/2"}
    assert progress_row(1.5, "load", "", step=1, steps=4, stage_fraction=-1) == {
        "fraction": 1.0, "stage": "load", "message": "", "step": 1, "steps": 4, "stage_fraction": 0.0}
    for bad in (dict(fraction="half", stage="load"), dict(fraction=True, stage="load"), dict(fraction=0.5, stage="")):
        with pytest.raises(CfdebugError, match="progress"):
            progress_row(message="", **bad)


def test_run_stages_map_each_stage_onto_its_span_and_log_through_the_registry(tmp_path, monkeypatch):
    import cfdebug.runs.progress
    from cfdebug.runs import RunStages, progress_of

    monkeypatch.setattr(cfdebug.runs.progress, "PROGRESS_EVERY_S", 0.0)
    reg = RunRegistry(tmp_path)
    run_id = reg.create("prepare", {}).run_id
    echoed = []
    stages = RunStages.equal(["load", "extract"], lambda row: reg.log_progress(run_id, row), lambda f, m: echoed.append((f, m)))
    load = stages.stage("load", "Loading")  # logs its first row at once
    load(0.5, "half")
    stages.stage("extract")(1.0, "done")
    rows = reg.progress(run_id)
    assert [(r["fraction"], r["stage"], r["message"], r["step"], r["stage_fraction"]) for r in rows] == [
        (0.0, "load", "Loading", 1, 0.0), (0.25, "load", "Loading: half", 1, 0.5), (0.5, "extract", "", 2, 0.0), (1.0, "extract", "done", 2, 1.0)]
    assert echoed == [(r["fraction"], r["message"]) for r in rows]
    assert progress_of(reg, run_id).fraction == 1.0 and progress_of(reg, run_id).steps == 2
    assert RunStages.equal(["a"]).stage("a") is None  # nowhere to report: callers pass None on


def test_rows_of_older_runs_still_read():
    """Rows written before the one shape: an XCR row without step, a run of engine rows only."""
    from cfdebug.runs import read_progress

    xcr = read_progress([(0.0, {"fraction": 0.2, "message": "selector epoch 1", "stage": "table1"}),
                         (10.0, {"fraction": 0.3, "message": "selector epoch 2", "stage": "table1"})], now=10.0)
    assert xcr.fraction == 0.3 and xcr.seconds_left == pytest.approx(70.0) and xcr.describe() == "selector epoch 2 · about 70 s left"
    engine = read_progress([(0.0, {"epoch": 1, "loss": 0.5}), (5.0, {"epoch": 2, "loss": 0.4})])
    assert engine.fraction == 0.0 and [e["epoch"] for e in engine.epochs] == [1, 2] and engine.message == "epoch 2"


# ------------------------------------------------------------------------ a read-only workdir
@pytest.fixture
def read_only_disk(tmp_path):
    """``(disk, make_read_only)``: a small tmpfs at ``tmp_path/disk`` and a function remounting it
    read-only (which refuses writes to root too, unlike chmod); skipped where it cannot be mounted."""
    with tmpfs(tmp_path / "disk", "8m") as disk:
        yield disk, lambda: subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _registry_with_runs(home: Path) -> None:
    """A done run, a running one whose process died (listed as failed, never marked: read-only)
    and a cancelled one."""
    reg = RunRegistry(home)
    reg.create("treat", {"a": 1}, run_id="done-1")
    reg.set_result("done-1", {"acc": 0.5})
    reg.create("xcr", {}, run_id="ghost")
    reg.set_status("ghost", "running", pid=_dead_pid())
    reg.create("prepare", {"key": "k"}, run_id="stopped")
    reg.set_status("stopped", "cancelled", error="cancelled on request")


def _listed(capsys, home: Path) -> dict[str, str]:
    from cfdebug.cli import main

    assert main(["runs", "--workdir", str(home)]) == 0
    out = capsys.readouterr().out
    return {line.split()[0]: line.split()[2] for line in out.splitlines()}


def test_runs_lists_a_read_only_workdir_without_writing(read_only_disk, capsys):
    """The last writer closed cleanly (no -wal/-shm; SQLite's mode=ro alone cannot open that
    WAL database on a read-only disk): listed through immutable=1, nothing created or written."""
    disk, make_read_only = read_only_disk
    home = disk / "home"
    _registry_with_runs(home)
    assert not (home / "runs.db-wal").exists()
    before = _files(disk)
    make_read_only()
    assert _listed(capsys, home) == {"stopped": "cancelled", "ghost": "failed", "done-1": "done"}
    reg = RunRegistry.for_reading(home)
    assert reg.read_only and "resume with" in reg.get("ghost").error and reg.get("done-1").result == {"acc": 0.5}
    assert reg.reconcile() == []
    with pytest.raises(CfdebugError, match="opened read-only"):
        reg.request_cancel("ghost")
    from cfdebug.cli import main

    assert main(["runs", "--workdir", str(home), "--cancel", "ghost"]) == 2
    assert "error:" in capsys.readouterr().err
    assert _files(disk) == before  # nothing written (the disk would refuse it anyway, root or not)


def test_runs_lists_a_read_only_workdir_whose_wal_holds_the_last_commits(read_only_disk, capsys):
    """A WAL that still holds commits (a writer that was killed): read with mode=ro, which sees
    them (immutable=1 would not)."""
    disk, make_read_only = read_only_disk
    live = disk.parent / "live"
    _registry_with_runs(live)
    keeper = sqlite3.connect(live / "runs.db")  # while it is open, the -wal/-shm files stay
    keeper.execute("SELECT count(*) FROM runs").fetchone()
    RunRegistry(live).create("treat", {}, run_id="in-the-wal")
    home = disk / "home"
    home.mkdir()
    for name in ("runs.db", "runs.db-wal", "runs.db-shm"):
        (home / name).write_bytes((live / name).read_bytes())
    keeper.close()
    make_read_only()
    frozen = sqlite3.connect(f"{(home / 'runs.db').as_uri()}?mode=ro&immutable=1", uri=True)
    assert "in-the-wal" not in {r for (r,) in frozen.execute("SELECT run_id FROM runs")}  # only in the -wal
    frozen.close()
    assert _listed(capsys, home) == {"in-the-wal": "queued", "stopped": "cancelled", "ghost": "failed", "done-1": "done"}


def test_runs_lists_nothing_in_a_read_only_workdir_without_a_registry(read_only_disk, capsys):
    disk, make_read_only = read_only_disk
    make_read_only()
    from cfdebug.cli import main

    assert main(["runs", "--workdir", str(disk / "home")]) == 0
    assert capsys.readouterr().out.startswith(f"no runs in {disk / 'home' / 'runs.db'}")
    assert list(disk.iterdir()) == []
