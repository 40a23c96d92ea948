"""The run registry: one row per run and one per progress row, in ``WORKDIR/runs.db``.

A run's statuses (:data:`STATUSES`)::

    queued ──begin_launch()──► running ──set_result()──► done
                                  │  └─exception / reconcile() of a dead pid──► failed ──► running
                                  └─cancel──► cancelled ──begin_launch()──► running

* ``WORKDIR/runs/<run_id>/`` is the run directory: ``run.json`` (``{"kind", "run_id",
  "config"}``, written atomically by :meth:`RunRegistry.create`), ``progress.jsonl`` (one JSON
  line per :meth:`RunRegistry.log_progress`, appended after the commit as one ``O_APPEND``
  write, so a retried transaction never duplicates a line), ``result.json``
  (:meth:`RunRegistry.set_result`), ``log.txt`` (the child's output, see
  :func:`cfdebug.runs.launch`) and the checkpoints the run keeps for resuming. The database is
  the source of truth: its JSON columns keep a non-finite float (a diverged loss's NaN) as a bare
  literal that reads back as a float, while the run files are valid JSON for other tools (such a
  float written as ``null``), both by the one encoder, :func:`cfdebug.store.json_text`.
* **Crash detection**: :meth:`RunRegistry.reconcile` (called by :meth:`~RunRegistry.get` and
  :meth:`~RunRegistry.list`) turns a ``running`` run whose pid is gone into ``failed`` with a
  message saying how to resume (``cancelled`` when its cancel was requested). It only judges
  runs started on this host (:mod:`cfdebug.procs`) and costs one indexed query plus
  ``os.kill(pid, 0)`` per running run.
* Timestamps (``created``, ``updated``) are float seconds since the epoch (``time.time()``).

Cheap to construct and safe to use from any thread or process: a :class:`RunRegistry` keeps
nothing but paths; every method opens (and closes) its own connection (:mod:`cfdebug.runs.database`).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shlex
import sqlite3
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple

from ..errors import CfdebugError
from ..store import json_text, write_text_atomic
from .database import DEFAULT_LOCK_TIMEOUT_S, RunDatabase
from ..procs import pid_alive, proc_stat, this_host

__all__ = ["STATUSES", "FINISHED_STATUSES", "LIST_RUNS_HINT", "STALE_LAUNCH_S", "RunProcess", "RunRecord", "RunRegistry"]

STATUSES = ("queued", "running", "done", "failed", "cancelled")
FINISHED_STATUSES = ("done", "failed", "cancelled")

#: How a user lists runs; used in error messages.
LIST_RUNS_HINT = "list them with `python -m cfdebug runs` (or `RunRegistry(workdir).list()`)"

#: A run marked running by :meth:`RunRegistry.begin_launch` gets its pid within milliseconds; one
#: still without a pid after this long lost its launcher (killed between the two writes) and may
#: be launched or cancelled again; a queued run this old is not joined (:meth:`RunRegistry.create_or_join`).
STALE_LAUNCH_S = 60.0
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

_RUN_COLUMNS = (
    "r.run_id, r.kind, r.status, r.config, r.created, r.updated, r.pid, r.result, r.error, "
    "r.cancel_requested, "
    "(SELECT p.row FROM progress p WHERE p.run_id = r.run_id ORDER BY p.id DESC LIMIT 1)"
)


@dataclass(frozen=True)
class RunRecord:
    """One run as stored in the registry.

    ``config``/``result`` are the JSON-decoded dicts; ``progress`` is the latest progress row
    (``None`` before the first); ``created``/``updated`` are epoch seconds; ``pid`` is the
    process that runs it (the launcher's child for a launched run), ``None`` before launch.
    """

    run_id: str
    kind: str
    status: str
    config: dict
    created: float
    updated: float
    pid: int | None
    progress: dict | None
    result: dict | None
    error: str | None
    run_dir: Path
    cancel_requested: bool = False

    @property
    def finished(self) -> bool:
        """True for ``done``, ``failed`` and ``cancelled``."""
        return self.status in FINISHED_STATUSES

    @property
    def active(self) -> bool:
        """True for ``queued`` and ``running``."""
        return self.status in ("queued", "running")

    @property
    def launch_lost(self) -> bool:
        """A running run still without a pid :data:`STALE_LAUNCH_S` after its launch began: its
        launcher died between the two writes, and nothing runs it."""
        return self.status == "running" and self.pid is None and time.time() - self.updated > STALE_LAUNCH_S

    @property
    def config_path(self) -> Path:
        return self.run_dir / "run.json"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "log.txt"

    @property
    def progress_path(self) -> Path:
        return self.run_dir / "progress.jsonl"


class RunProcess(NamedTuple):
    """Who runs a run, as the registry recorded it (:meth:`RunRegistry.process_of`)."""

    status: str | None
    pid: int | None
    pid_start: str | None  # the process's start time (processes.proc_stat), to tell a reused pid
    host: str | None


class RunRegistry:
    """The run registry of one workdir: ``WORKDIR/runs.db`` and ``WORKDIR/runs/<run_id>/``.

    Args:
        workdir: the cfdebug work directory (``--workdir`` / ``CFDEBUG_HOME``); created if needed.
        lock_timeout_s: how long a write waits for another process's lock (with backoff) before
            raising :class:`~cfdebug.errors.CfdebugError`. Must be positive.
        read_only: read the registry without creating or writing anything (a read-only workdir,
            :meth:`for_reading`): every write raises :class:`~cfdebug.errors.CfdebugError`, and
            :meth:`get`/:meth:`list` show a run whose process died as :meth:`reconcile` would mark
            it, without marking it.
    """

    def __init__(self, workdir: str | Path, *, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S, read_only: bool = False):
        if not (isinstance(lock_timeout_s, (int, float)) and lock_timeout_s > 0):
            raise CfdebugError(f"Expected `lock_timeout_s` to be a positive number of seconds, but got {lock_timeout_s!r}.")
        self.workdir = Path(workdir)
        self.db_path = self.workdir / "runs.db"
        self.runs_dir = self.workdir / "runs"
        self.lock_timeout_s = float(lock_timeout_s)
        self.read_only = bool(read_only)
        if not self.read_only:
            try:
                self.runs_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CfdebugError(
                    f"Cannot create the run directory {self.runs_dir}: {exc.strerror}. "
                    "Pass a writable folder with `--workdir` or set CFDEBUG_HOME."
                ) from exc
        self.db = RunDatabase(self.db_path, self.runs_dir, self.lock_timeout_s, read_only=self.read_only)

    @classmethod
    def for_reading(cls, workdir: str | Path, *, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> RunRegistry:
        """The registry of ``workdir`` for listing and reading runs: a writable one where this
        process can write there (so :meth:`reconcile` marks runs whose process died), else a
        read-only one (a read-only mount, which refuses root too, or a folder without write
        permission) that creates and writes nothing."""
        return cls(workdir, lock_timeout_s=lock_timeout_s, read_only=not _can_write(Path(workdir)))

    def run_dir(self, run_id: str) -> Path:
        """``WORKDIR/runs/<run_id>`` (not checked for existence)."""
        return self.runs_dir / run_id

    def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        return self.db.execute(fn, write=False)

    def _write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        return self.db.execute(fn, write=True)

    # ------------------------------------------------------------------ runs
    def create(self, kind: str, config: dict, run_id: str | None = None) -> RunRecord:
        """Register a new run with status ``queued`` and write ``run_dir/run.json`` atomically.

        Args:
            kind: what runs it, e.g. ``"treat"`` or ``"xcr"`` (letters, digits, ``._-``).
            config: a JSON-serialisable dict (e.g. ``dataclasses.asdict(config)``).
            run_id: optional id (letters, digits, ``._-``, up to 128 characters); default
                ``<kind>-<YYYYmmdd-HHMMSS>-<6 hex>``.
        """
        insert, run_id = self._inserter(kind, config, run_id)
        self._write(insert)
        return self.get(run_id)

    def _inserter(self, kind: str, config: dict, run_id: str | None) -> tuple[Callable[[sqlite3.Connection], None], str]:
        """``(insert(conn), run_id)``: the checked write of :meth:`create`, to run inside a write transaction."""
        _check_name("kind", kind)
        if not isinstance(config, dict):
            raise CfdebugError(f"Expected `config` to be a dict (e.g. dataclasses.asdict(cfg)), but got {type(config).__name__}.")
        run_id = run_id if run_id is not None else f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        _check_name("run_id", run_id)
        config_text = _column(config, "config")
        run_json = json_text({"kind": kind, "run_id": run_id, "config": config}, indent=2, what="config")
        return lambda conn: _insert_run(conn, self.db_path, self.run_dir(run_id), kind, config_text, run_json), run_id

    def find_active(self, kind: str, key: str) -> RunRecord | None:
        """The queued or running run of ``kind`` whose config holds ``"key": key``, or ``None``."""
        self.reconcile()
        run_id = self._read(lambda conn: _active_id(conn, kind, key))
        return None if run_id is None else self.get(run_id)

    def create_or_join(self, kind: str, config: dict) -> tuple[RunRecord, bool]:
        """``(run, created)``: the active run of ``kind`` with ``config["key"]`` (see
        :meth:`find_active`), or a new queued one (:meth:`create`) when there is none.

        The lookup and the insert share one write transaction, so two callers racing for the same
        key (two browser sessions asking for the same artifact) get one run between them.
        """
        key = config.get("key") if isinstance(config, dict) else None
        if not isinstance(key, str) or not key:
            raise CfdebugError(f"Expected the run config to hold a non-empty string `key`, but got {key!r}.")
        insert, new_id = self._inserter(kind, config, None)
        self.reconcile()  # a run whose process died is not joined

        def join_or_insert(conn: sqlite3.Connection) -> str | None:
            found = _active_id(conn, kind, key)
            if found is None:
                insert(conn)
            return found

        found = self._write(join_or_insert)
        return self.get(found or new_id), found is None

    def get(self, run_id: str) -> RunRecord:
        """The run ``run_id``; an unknown id raises :class:`CfdebugError` naming close matches."""
        self.reconcile()

        def read(conn: sqlite3.Connection) -> RunRecord:
            row = conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs r WHERE r.run_id = ?", (run_id,)).fetchone()
            if row is None:
                _require(conn, run_id, self.db_path)  # raises, naming close matches
            return _record(row, self.run_dir(run_id))

        return self._judged([self._read(read)])[0]

    def list(self, kind: str | None = None) -> list[RunRecord]:
        """All runs (of ``kind`` if given), newest first."""
        self.reconcile()
        where, args = ("WHERE r.kind = ?", (kind,)) if kind is not None else ("", ())
        query = f"SELECT {_RUN_COLUMNS} FROM runs r {where} ORDER BY r.created DESC, r.rowid DESC"
        return self._judged(self._read(lambda conn: [_record(row, self.run_dir(row[0])) for row in conn.execute(query, args).fetchall()]))

    def _judged(self, records: list[RunRecord]) -> list[RunRecord]:
        """``records``, where the registry is read-only with the runs whose process died shown as
        :meth:`reconcile` would mark them (nothing is written); a writable registry marked them already."""
        if not self.read_only:
            return records
        dead = {run_id: (kind, argv) for run_id, kind, _, argv in self._dead_runs()}
        out = []
        for r in records:
            if r.run_id in dead and r.status == "running":
                status, error = ("cancelled", "cancelled on request") if r.cancel_requested else ("failed", self._ended_message(r.run_id, *dead[r.run_id]))
                r = replace(r, status=status, error=error)
            out.append(r)
        return out

    def set_status(self, run_id: str, status: str, *, error: str | None = None, pid: int | None = None) -> None:
        """Set the status of a run.

        ``error`` replaces the stored error message (``None`` clears it). ``pid`` (if given)
        records the process running the run, with this host's name and the process start time.
        """
        if status not in STATUSES:
            raise CfdebugError(f"Expected `status` to be one of {', '.join(STATUSES)}, but got {status!r}.")
        if pid is not None and not (isinstance(pid, int) and pid > 0):
            raise CfdebugError(f"Expected `pid` to be a positive integer, but got {pid!r}.")

        def update(conn: sqlite3.Connection) -> None:
            _require(conn, run_id, self.db_path)
            conn.execute("UPDATE runs SET status = ?, error = ?, updated = ? WHERE run_id = ?", (status, error, time.time(), run_id))
            if pid is not None:
                _store_pid(conn, run_id, pid)

        self._write(update)

    def set_result(self, run_id: str, result: dict) -> None:
        """Store the run's result, write ``run_dir/result.json`` atomically, set status ``done``."""
        if not isinstance(result, dict):
            raise CfdebugError(f"Expected a result to be a dict, but got {type(result).__name__}.")
        text = _column(result, "result")

        def update(conn: sqlite3.Connection) -> None:
            _require(conn, run_id, self.db_path)
            conn.execute("UPDATE runs SET result = ?, status = 'done', error = NULL, updated = ? WHERE run_id = ?", (text, time.time(), run_id))

        self._write(update)
        write_text_atomic(self.run_dir(run_id) / "result.json", json_text(result, indent=2, what="result") + "\n")

    # ------------------------------------------------------------------ progress rows
    def log_progress(self, run_id: str, row: dict) -> None:
        """Append a progress row (:mod:`cfdebug.runs.progress` says what a row holds).

        Stored in the ``progress`` table and appended as one line to ``run_dir/progress.jsonl``.
        Rows are stored as given (no timestamp is added; the table keeps one for its own use).
        """
        if not isinstance(row, dict):
            raise CfdebugError(f"Expected a progress row to be a dict, but got {type(row).__name__}.")
        text = _column(row, "progress row")

        def insert(conn: sqlite3.Connection) -> None:
            _require(conn, run_id, self.db_path)
            now = time.time()
            conn.execute("INSERT INTO progress (run_id, logged, row) VALUES (?, ?, ?)", (run_id, now, text))
            conn.execute("UPDATE runs SET updated = ? WHERE run_id = ?", (now, run_id))

        self._write(insert)
        # After the commit, so a retried transaction never writes the line twice. One os.write on
        # an O_APPEND descriptor: concurrent writers' lines never interleave on a local disk.
        path = self.run_dir(run_id) / "progress.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json_text(row, what="progress row") + "\n").encode())
        finally:
            os.close(fd)

    def progress(self, run_id: str) -> list[dict]:
        """All progress rows of a run, oldest first."""
        return [row for _, row in self.timed_progress(run_id)]

    def timed_progress(self, run_id: str) -> list[tuple[float, dict]]:
        """All progress rows of a run with the time each was logged (epoch seconds), oldest first."""

        def read(conn: sqlite3.Connection) -> list[tuple[float, dict]]:
            _require(conn, run_id, self.db_path)
            rows = conn.execute("SELECT logged, row FROM progress WHERE run_id = ? ORDER BY id", (run_id,))
            return [(float(t), json.loads(r)) for t, r in rows]

        return self._read(read)

    # ------------------------------------------------------------------ cancel and processes
    def request_cancel(self, run_id: str) -> None:
        """Set the run's cancel flag (seen by :meth:`cancel_requested`); sends no signal."""

        def update(conn: sqlite3.Connection) -> None:
            _require(conn, run_id, self.db_path)
            conn.execute("UPDATE runs SET cancel_requested = 1, updated = ? WHERE run_id = ?", (time.time(), run_id))

        self._write(update)

    def cancel_requested(self, run_id: str) -> bool:
        """Whether a cancel was requested; one indexed read, cheap enough to call every step."""
        return self._read(lambda conn: bool(_require(conn, run_id, self.db_path)[3]))

    def reconcile(self) -> list[str]:
        """Mark ``running`` runs whose process has ended as ``failed`` (or ``cancelled``).

        Only runs whose pid was recorded on this host are judged. A run whose cancel was
        requested becomes ``cancelled``; any other becomes ``failed`` with an error saying how to
        resume it. Returns the ids it changed (none in a read-only registry, which writes nothing).
        """
        if self.read_only:
            return []
        changed = []
        for run_id, kind, pid, argv in self._dead_runs():
            message = self._ended_message(run_id, kind, argv)
            if self._write(lambda conn, run_id=run_id, pid=pid, message=message: _mark_dead(conn, run_id, pid, message)):
                changed.append(run_id)
        return changed

    def _dead_runs(self) -> list[tuple[str, str, int, str | None]]:
        """``(run_id, kind, pid, argv)`` of each ``running`` run of this host whose process has ended."""
        query = "SELECT run_id, kind, pid, pid_start, argv FROM runs WHERE status = 'running' AND pid IS NOT NULL AND host = ?"
        rows = self._read(lambda conn: conn.execute(query, (this_host(),)).fetchall())
        return [(run_id, kind, pid, argv) for run_id, kind, pid, pid_start, argv in rows if not pid_alive(pid, pid_start)]

    def _ended_message(self, run_id: str, kind: str, argv: str | None) -> str:
        return f"process ended without finishing (killed?); resume with `{self.resume_command(run_id, kind, argv)}`"

    def resume_command(self, run_id: str, kind: str | None = None, argv: str | None = None) -> str:
        """The shell command that resumes a run: its launch argv (JSON text) if known, else the default CLI."""
        if argv:
            return shlex.join(json.loads(argv))
        return shlex.join(["python", "-m", "cfdebug", kind or "treat", "--config", str(self.run_dir(run_id) / "run.json"), "--run-id", run_id])

    def begin_launch(self, run_id: str, argv: list[str]) -> None:
        """Mark a queued, failed or cancelled run ``running`` before its process starts: the pid
        is cleared (:meth:`record_pid` sets it), so are the error and the cancel flag, and
        ``argv`` is kept as the resume command. A done run, or a running one (unless its launch
        was lost, :attr:`RunRecord.launch_lost`), is refused."""

        self.reconcile()  # first, so a run whose process just died can be relaunched (resumed)
        self._write(lambda conn: _begin_launch(conn, run_id, argv, self.db_path))

    def record_pid(self, run_id: str, pid: int) -> None:
        """Record ``pid`` (with its start time and this host) as the process that runs ``run_id``."""
        self._write(lambda conn: _store_pid(conn, run_id, pid))

    def process_of(self, run_id: str) -> RunProcess:
        """The run's status and recorded process, read as stored (no :meth:`reconcile`)."""
        query = "SELECT status, pid, pid_start, host FROM runs WHERE run_id = ?"
        return RunProcess(*(self._read(lambda conn: conn.execute(query, (run_id,)).fetchone()) or (None, None, None, None)))

    def finish_if_running(self, run_id: str, status: str, error: str | None) -> bool:
        """Set a ``running`` run's final ``status`` and ``error``; a run that is no longer running
        (:meth:`set_result` made it done, say) is left alone. Returns whether it changed."""
        query = "UPDATE runs SET status = ?, error = ?, updated = ? WHERE run_id = ? AND status = 'running'"
        return self._write(lambda conn: conn.execute(query, (status, error, time.time(), run_id)).rowcount > 0)

    def cancel_if_queued(self, run_id: str) -> bool:
        """Make a ``queued`` run (never launched) ``cancelled``; a launch that won the race is left alone."""
        query = ("UPDATE runs SET status = 'cancelled', error = 'cancelled before it started', updated = ? "
                 "WHERE run_id = ? AND status = 'queued'")
        return self._write(lambda conn: conn.execute(query, (time.time(), run_id)).rowcount > 0)


def _can_write(workdir: Path) -> bool:
    """Whether this process may create files in ``workdir`` (or the folder that would hold it) and
    change its ``runs.db``: ``os.access`` asks the kernel, which refuses a read-only mount to root too."""
    folder = workdir
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    db = workdir / "runs.db"
    return not db.exists() or os.access(db, os.R_OK | os.W_OK)


# ---------------------------------------------------------------------- SQL helpers
def _column(value: Any, what: str) -> str:
    """``value`` as a JSON column: NaN and ±inf kept as bare literals (:func:`cfdebug.store.json_text`),
    so a diverged loss reads back as NaN."""
    return json_text(value, keep_nan=True, what=what)


def _require(conn: sqlite3.Connection, run_id: str, db_path: Path) -> tuple:
    """``(status, pid, updated, cancel_requested)`` of ``run_id``; an unknown id raises a
    :class:`CfdebugError` naming close matches."""
    row = conn.execute("SELECT status, pid, updated, cancel_requested FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    if row is None:
        ids = [r[0] for r in conn.execute("SELECT run_id FROM runs ORDER BY created DESC")]
        close = difflib.get_close_matches(str(run_id), ids, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise CfdebugError(
            f"Expected the id of a run in the registry at {db_path}, but found no run "
            f"{run_id!r} ({len(ids)} runs known).{hint} Check the id; {LIST_RUNS_HINT}."
        )
    return row


def _record(row: tuple, run_dir: Path) -> RunRecord:
    """A row of :data:`_RUN_COLUMNS` as a record; a row whose JSON columns do not parse (edited
    or damaged by hand) is kept, with status ``unreadable``, ``config`` ``None`` and an error
    naming the column."""
    run_id, kind, status, config, created, updated, pid, result, error, cancel_req, last = row
    decoded = {}
    for name, text in {"config": config, "progress": last, "result": result}.items():
        try:
            decoded[name] = json.loads(text) if text is not None else None
        except (TypeError, ValueError):
            decoded[name] = None
            status, error = "unreadable", f"unreadable registry row: its {name} is not valid JSON"
    if not isinstance(decoded["config"], dict) and status != "unreadable":
        status, error = "unreadable", "unreadable registry row: its config is not a JSON object"
    return RunRecord(
        run_id=run_id, kind=kind, status=status, config=decoded["config"], created=created, updated=updated, pid=pid,
        progress=decoded["progress"], result=decoded["result"], error=error, run_dir=run_dir, cancel_requested=bool(cancel_req),
    )


def _insert_run(conn: sqlite3.Connection, db_path: Path, run_dir: Path, kind: str, config_text: str, run_json: str) -> None:
    """Insert a queued run; its ``run.json`` is written while the write lock is held, after the
    duplicate check, so a second create with the same id never overwrites the first run's config."""
    run_id = run_dir.name
    if conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone():
        raise CfdebugError(
            f"Expected a new run id, but a run {run_id!r} already exists in {db_path}. "
            f"Pick another id or leave it out to get a fresh one; {LIST_RUNS_HINT}."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "run.json", run_json + "\n")
    now = time.time()
    conn.execute(
        "INSERT INTO runs (run_id, kind, status, config, created, updated) VALUES (?, ?, 'queued', ?, ?, ?)",
        (run_id, kind, config_text, now, now),
    )


def _active_id(conn: sqlite3.Connection, kind: str, key: str) -> str | None:
    """The newest queued or running run of ``kind`` whose config's ``key`` is ``key``; a queued
    run older than :data:`STALE_LAUNCH_S` lost its launcher and is not joined."""
    rows = conn.execute(
        "SELECT run_id, status, updated, config FROM runs WHERE kind = ? AND status IN ('queued', 'running') "
        "ORDER BY created DESC, rowid DESC",
        (kind,),
    ).fetchall()
    for run_id, status, updated, config in rows:
        if status == "queued" and time.time() - updated > STALE_LAUNCH_S:
            continue
        if (json.loads(config) or {}).get("key") == key:
            return run_id
    return None


def _begin_launch(conn: sqlite3.Connection, run_id: str, argv: list[str], db_path: Path) -> None:
    status, pid, updated, _ = _require(conn, run_id, db_path)
    if status == "done":
        raise CfdebugError(
            f"Expected a queued, failed or cancelled run to launch, but run {run_id!r} is "
            "already done. Create a new run with the same config to run it again."
        )
    # A running run without a pid is being launched by someone else right now, unless stale.
    if status == "running" and (pid is not None or time.time() - updated < STALE_LAUNCH_S):
        raise CfdebugError(
            f"Expected a run that is not running, but run {run_id!r} is running "
            f"({f'pid {pid}' if pid is not None else 'being launched'}). Wait for it, or cancel it first."
        )
    conn.execute(
        "UPDATE runs SET status = 'running', pid = NULL, pid_start = NULL, host = NULL, "
        "argv = ?, error = NULL, cancel_requested = 0, updated = ? WHERE run_id = ?",
        (json_text(argv, what="argv"), time.time(), run_id),
    )


def _mark_dead(conn: sqlite3.Connection, run_id: str, pid: int, message: str) -> bool:
    """A running run whose process ``pid`` is gone: ``cancelled`` if its cancel was requested,
    else ``failed`` with ``message``. Conditional on status and pid: a run that finished (or was
    relaunched) since it was read is left alone."""
    cur = conn.execute(
        "UPDATE runs SET status = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'failed' END, "
        "error = CASE WHEN cancel_requested THEN 'cancelled on request' ELSE ? END, updated = ? "
        "WHERE run_id = ? AND status = 'running' AND pid = ?",
        (message, time.time(), run_id, pid),
    )
    return cur.rowcount > 0


def _store_pid(conn: sqlite3.Connection, run_id: str, pid: int) -> None:
    stat = proc_stat(pid)
    conn.execute(
        "UPDATE runs SET pid = ?, pid_start = ?, host = ?, updated = ? WHERE run_id = ?",
        (pid, stat.start if stat else None, this_host(), time.time(), run_id),
    )


def _check_name(what: str, value: Any) -> None:
    if not (isinstance(value, str) and _ID_PATTERN.match(value)):
        raise CfdebugError(
            f"Expected `{what}` to be 1-128 letters, digits, '.', '_' or '-' (starting with a letter "
            f"or digit; it names a folder), but got {value!r}."
        )
