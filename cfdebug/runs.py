"""Run registry (SQLite) and background runs: progress, result, cancel, crash detection.

A long job (a treatment or XCR training run) is a separate OS process running the same command
a user can type, e.g. ``python -m cfdebug treat --config RUN_DIR/run.json --run-id ID``. It
reports to two places:

* ``WORKDIR/runs.db``: a SQLite registry (stdlib ``sqlite3``, WAL mode) with one row per run
  and one row per progress record. The dashboard, the CLI and every run process read and write
  it at the same time.
* ``WORKDIR/runs/<run_id>/``: the run directory, holding ``run.json`` (``{"kind", "run_id",
  "config"}``, what the child process is started with), ``progress.jsonl`` (one JSON row per
  :meth:`RunRegistry.log_progress`), ``log.txt`` (the child's stdout and stderr),
  ``result.json`` (written by :meth:`RunRegistry.set_result`) and whatever checkpoints the
  training code keeps there for resuming.

Life cycle (``STATUSES``)::

    queued ──launch()──► running ──set_result()──► done
                            │  └─exception / reconcile() of a dead pid──► failed ──launch()──► running
                            └─cancel()──► cancelled ──launch()──► running

Design choices
--------------
* **When a run becomes "running"**: :func:`launch` sets ``running`` itself, *before* the child
  starts, and then records the child's pid. So the dashboard shows the run at once, and a child
  that dies before it reports anything (an import error, a bad argument) is still caught by
  :meth:`RunRegistry.reconcile`. Setting the status before ``Popen`` (not after) means a very fast
  child that finishes first can never have its ``done`` overwritten by ``running``. A run started
  by hand (no :func:`launch`) marks itself running through :func:`run_context`.
* **How a cancel is seen**: :func:`cancel` sets a flag in the registry and sends ``SIGTERM`` to
  the run's process group (runs are started in a new session, so ``torchrun`` and its workers
  all get it). A child inside :func:`run_context` turns ``SIGTERM`` into :class:`RunCancelled`
  and ends as ``cancelled``; it should also poll :meth:`RunRegistry.cancel_requested` (or call
  :func:`check_cancel`) between steps, which covers runs on another host and children that
  ignore signals. A child that dies from the signal without reporting is marked ``cancelled``
  (not ``failed``) by :meth:`RunRegistry.reconcile`, because the flag says it was asked to stop.
* **Crash detection**: :meth:`RunRegistry.reconcile` (called by :meth:`~RunRegistry.get` and
  :meth:`~RunRegistry.list`) turns a ``running`` run whose pid is gone into ``failed`` with a
  message saying how to resume. It only judges runs started on this host, treats a zombie as
  dead, and compares the process start time (Linux ``/proc``) so a reused pid is not mistaken for
  the run. It costs one indexed query plus ``os.kill(pid, 0)`` per running run.
* **JSON columns**: config, progress rows and results are stored as JSON text. ``NaN``,
  ``Infinity`` and ``-Infinity`` are written as those bare literals (Python's ``json``
  extension, ``allow_nan=True``) and come back as floats, so a diverged loss survives the round
  trip. NumPy scalars/arrays and 0-d tensors are converted with ``.item()``/``.tolist()``; paths
  become strings; anything else raises :class:`~cfdebug.errors.CfdebugError`.
* **Concurrency**: one fresh connection per operation (``sqlite3`` connections must not cross
  threads, and Streamlit runs each script in its own thread), WAL so readers never block the
  writer, ``busy_timeout`` plus an outer retry with exponential backoff (``lock_timeout_s``,
  default 10 s), and every write in a short ``BEGIN IMMEDIATE`` transaction so two writers queue
  up instead of deadlocking on a read-to-write upgrade. The database is the source of truth;
  ``progress.jsonl`` is appended after the commit (a single ``O_APPEND`` write per row) so a
  retried transaction never duplicates a line.
* Timestamps (``created``, ``updated``) are float seconds since the epoch (``time.time()``).

POSIX only (process groups, ``start_new_session``), like the rest of the run tooling.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

from .errors import CfdebugError
from .store import write_text_atomic

__all__ = [
    "STATUSES",
    "FINISHED_STATUSES",
    "RunRecord",
    "RunRegistry",
    "RunCancelled",
    "launch",
    "start_background_run",
    "cancel",
    "run_context",
    "check_cancel",
    "seconds_left",
    "describe_seconds_left",
]

STATUSES = ("queued", "running", "done", "failed", "cancelled")
FINISHED_STATUSES = ("done", "failed", "cancelled")

#: How a user lists runs; used in error messages.
LIST_RUNS_HINT = "list them with `python -m cfdebug runs` (or `RunRegistry(workdir).list()`)"

#: The run kinds :func:`start_background_run` starts (each a ``python -m cfdebug <kind>`` command).
BACKGROUND_KINDS = ("treat", "xcr", "prepare")
#: The folder holding the ``cfdebug`` package; put first on a child's PYTHONPATH so it imports this copy.
PACKAGE_ROOT = Path(__file__).resolve().parents[1]

DEFAULT_LOCK_TIMEOUT_S = 10.0
# One attempt waits at most this long inside SQLite's own busy handler before the outer retry
# loop backs off and tries again; keeps the total wait close to the budget.
_ATTEMPT_TIMEOUT_S = 2.0
_SCHEMA_VERSION = 1
# A run marked running by launch() gets its pid within milliseconds; one still without a pid after
# this long lost its launcher (killed between the two writes) and may be launched or cancelled again.
_STALE_LAUNCH_S = 60.0
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    config TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    pid INTEGER,
    pid_start TEXT,
    host TEXT,
    argv TEXT,
    result TEXT,
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status);
CREATE TABLE IF NOT EXISTS progress (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    logged REAL NOT NULL,
    row TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS progress_run ON progress(run_id, id);
"""

_RUN_COLUMNS = (
    "r.run_id, r.kind, r.status, r.config, r.created, r.updated, r.pid, r.result, r.error, "
    "r.cancel_requested, "
    "(SELECT p.row FROM progress p WHERE p.run_id = r.run_id ORDER BY p.id DESC LIMIT 1)"
)


class RunCancelled(Exception):
    """Raised inside a run process when its cancel was requested (flag or SIGTERM)."""


@dataclass(frozen=True)
class RunRecord:
    """One run as stored in the registry.

    ``config``/``result`` are the JSON-decoded dicts; ``progress`` is the latest progress row
    (``None`` before the first); ``created``/``updated`` are epoch seconds; ``pid`` is the
    process that runs it (the launcher's pid for a launched run), ``None`` before launch.
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
    def config_path(self) -> Path:
        return self.run_dir / "run.json"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "log.txt"

    @property
    def progress_path(self) -> Path:
        return self.run_dir / "progress.jsonl"


class RunRegistry:
    """The run registry of one workdir: ``WORKDIR/runs.db`` and ``WORKDIR/runs/<run_id>/``.

    Cheap to construct and safe to use from any thread or process: nothing but paths is kept,
    every method opens (and closes) its own SQLite connection.

    Args:
        workdir: the cfdebug work directory (``--workdir`` / ``CFDEBUG_HOME``); created if needed.
        lock_timeout_s: how long a write waits for another process's lock (with backoff) before
            raising :class:`~cfdebug.errors.CfdebugError`. Must be positive.
    """

    def __init__(self, workdir: str | Path, *, lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S):
        if not (isinstance(lock_timeout_s, (int, float)) and lock_timeout_s > 0):
            raise CfdebugError(
                f"Expected `lock_timeout_s` to be a positive number of seconds, but got {lock_timeout_s!r}."
            )
        self.workdir = Path(workdir)
        self.db_path = self.workdir / "runs.db"
        self.runs_dir = self.workdir / "runs"
        self.lock_timeout_s = float(lock_timeout_s)
        try:
            self.runs_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CfdebugError(
                f"Cannot create the run directory {self.runs_dir}: {exc.strerror}. "
                "Pass a writable folder with `--workdir` or set CFDEBUG_HOME."
            ) from exc
        self._init_db()

    # ------------------------------------------------------------------ connection plumbing
    def _connect(self, timeout: float) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions, so writes use our BEGIN IMMEDIATE.
        conn = sqlite3.connect(self.db_path, timeout=timeout, isolation_level=None)
        # synchronous=NORMAL is durable enough in WAL mode (a power cut may lose the last commits,
        # never corrupts) and avoids an fsync per progress row.
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _execute(self, fn: Callable[[sqlite3.Connection], Any], *, write: bool) -> Any:
        """Run ``fn(conn)`` on a fresh connection, in a ``BEGIN IMMEDIATE`` transaction if ``write``.

        Retries the whole operation with exponential backoff while the database is busy, up to
        ``lock_timeout_s``; nothing is committed by a failed attempt, so a retry is safe.
        """
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.02
        while True:
            remaining = deadline - time.monotonic()
            try:
                with closing(self._connect(max(0.05, min(_ATTEMPT_TIMEOUT_S, remaining)))) as conn:
                    if not write:
                        return fn(conn)
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        out = fn(conn)
                        conn.execute("COMMIT")
                        return out
                    except BaseException:
                        if conn.in_transaction:
                            try:
                                conn.execute("ROLLBACK")
                            except sqlite3.Error:
                                pass  # closing the connection rolls back anyway
                        raise
            except sqlite3.Error as exc:
                if _is_busy(exc):
                    remaining = deadline - time.monotonic()
                    if remaining > 0:
                        time.sleep(min(delay, remaining))
                        delay = min(delay * 2, 0.5)
                        continue
                user_error = self._user_error(exc)
                if user_error is exc:
                    raise
                raise user_error from exc

    def _user_error(self, exc: sqlite3.Error) -> Exception:
        """Turn a SQLite error a user can cause into a :class:`CfdebugError`; keep the rest."""
        text = str(exc).lower()
        if _is_busy(exc):
            return CfdebugError(
                f"the run registry at {self.db_path} is locked by another process; retry. "
                f"Expected to get a write lock within {self.lock_timeout_s:g} s, but another process "
                "(a dashboard, a run or a CLI command) held it longer. Retry in a moment; if it "
                "stays locked, stop the process that holds it."
            )
        if any(s in text for s in ("not a database", "malformed", "file is encrypted", "corrupt")):
            return CfdebugError(
                f"Expected {self.db_path} to be a SQLite run registry, but it is not a valid "
                f"database ({exc}). Move it aside (e.g. rename it to runs.db.bad, with runs.db-wal "
                "and runs.db-shm); a new empty registry is created on the next start and the run "
                f"directories under {self.runs_dir} are kept."
            )
        if any(s in text for s in ("unable to open", "readonly", "read-only", "disk i/o")):
            return CfdebugError(
                f"Expected to read and write the run registry at {self.db_path}, but SQLite says: "
                f"{exc}. Check that the work directory is writable and on a local disk, or pass "
                "another one with `--workdir` / CFDEBUG_HOME."
            )
        return exc

    def _init_db(self) -> None:
        def setup(conn: sqlite3.Connection) -> None:
            # journal_mode=WAL is persistent in the file; setting it needs no transaction.
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot switch runs.db to WAL (got {mode})")
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > _SCHEMA_VERSION:
                    raise CfdebugError(
                        f"Expected a run registry of schema version <= {_SCHEMA_VERSION}, but "
                        f"{self.db_path} has version {version} (written by a newer cfdebug). "
                        "Upgrade cfdebug or use another `--workdir`."
                    )
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        self._execute(setup, write=False)

    # ------------------------------------------------------------------ records
    def run_dir(self, run_id: str) -> Path:
        """``WORKDIR/runs/<run_id>`` (not checked for existence)."""
        return self.runs_dir / run_id

    def _record(self, row: tuple) -> RunRecord:
        """A row as a record; a row whose JSON columns do not parse (edited or damaged by hand) is
        kept, with status ``unreadable``, ``config`` ``None`` and an error naming the column."""
        run_id, kind, status, config, created, updated, pid, result, error, cancel_req, last = row
        columns = {"config": config, "progress": last, "result": result}
        decoded = {}
        for name, text in columns.items():
            try:
                decoded[name] = _loads(text) if text is not None else None
            except (TypeError, ValueError):
                decoded[name] = None
                status, error = "unreadable", f"unreadable registry row: its {name} is not valid JSON"
        if not isinstance(decoded["config"], dict) and status != "unreadable":
            status, error = "unreadable", "unreadable registry row: its config is not a JSON object"
        return RunRecord(
            run_id=run_id,
            kind=kind,
            status=status,
            config=decoded["config"],
            created=created,
            updated=updated,
            pid=pid,
            progress=decoded["progress"],
            result=decoded["result"],
            error=error,
            run_dir=self.run_dir(run_id),
            cancel_requested=bool(cancel_req),
        )

    def _unknown(self, conn: sqlite3.Connection, run_id: str) -> CfdebugError:
        ids = [r[0] for r in conn.execute("SELECT run_id FROM runs ORDER BY created DESC")]
        close = difflib.get_close_matches(str(run_id), ids, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return CfdebugError(
            f"Expected the id of a run in the registry at {self.db_path}, but found no run "
            f"{run_id!r} ({len(ids)} runs known).{hint} Check the id; {LIST_RUNS_HINT}."
        )

    def _require(self, conn: sqlite3.Connection, run_id: str) -> tuple:
        row = conn.execute(
            "SELECT run_id, kind, status, pid, argv, cancel_requested FROM runs WHERE run_id = ?",
            (run_id,),
        ).fetchone()
        if row is None:
            raise self._unknown(conn, run_id)
        return row

    # ------------------------------------------------------------------ public API
    def create(self, kind: str, config: dict, run_id: str | None = None) -> RunRecord:
        """Register a new run with status ``queued`` and write ``run_dir/run.json`` atomically.

        Args:
            kind: what runs it, e.g. ``"treat"`` or ``"xcr"`` (letters, digits, ``._-``).
            config: a JSON-serialisable dict (e.g. ``dataclasses.asdict(config)``).
            run_id: optional id (letters, digits, ``._-``, up to 128 characters); default
                ``<kind>-<YYYYmmdd-HHMMSS>-<6 hex>``.
        """
        insert, run_id = self._inserter(kind, config, run_id)
        self._execute(insert, write=True)
        return self.get(run_id)

    def _inserter(self, kind: str, config: dict, run_id: str | None) -> tuple[Callable[[sqlite3.Connection], None], str]:
        """``(insert(conn), run_id)``: the checked write of :meth:`create`, to run inside a write transaction."""
        _check_name("kind", kind)
        if not isinstance(config, dict):
            raise CfdebugError(
                f"Expected `config` to be a dict (e.g. dataclasses.asdict(cfg)), but got {type(config).__name__}."
            )
        if run_id is None:
            run_id = f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        _check_name("run_id", run_id)
        config_text = _dumps(config, what="config")
        run_json = _dumps({"kind": kind, "run_id": run_id, "config": config}, what="config", indent=2)
        run_dir = self.run_dir(run_id)

        def insert(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone():
                raise CfdebugError(
                    f"Expected a new run id, but a run {run_id!r} already exists in {self.db_path}. "
                    f"Pick another id or leave it out to get a fresh one; {LIST_RUNS_HINT}."
                )
            # run.json is written while we hold the write lock, after the duplicate check, so a
            # second create() with the same id can never overwrite the first run's config.
            run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(run_dir / "run.json", run_json + "\n")
            now = time.time()
            conn.execute(
                "INSERT INTO runs (run_id, kind, status, config, created, updated) VALUES (?, ?, 'queued', ?, ?, ?)",
                (run_id, kind, config_text, now, now),
            )

        return insert, run_id

    def _active_id(self, conn: sqlite3.Connection, kind: str, key: str) -> str | None:
        """The newest queued or running run of ``kind`` whose config's ``key`` is ``key``.

        A queued run older than ``_STALE_LAUNCH_S`` lost its launcher and is not joined."""
        rows = conn.execute(
            "SELECT run_id, status, updated, config FROM runs WHERE kind = ? AND status IN ('queued', 'running') "
            "ORDER BY created DESC, rowid DESC",
            (kind,),
        ).fetchall()
        for run_id, status, updated, config in rows:
            if status == "queued" and time.time() - updated > _STALE_LAUNCH_S:
                continue
            if (_loads(config) or {}).get("key") == key:
                return run_id
        return None

    def find_active(self, kind: str, key: str) -> RunRecord | None:
        """The queued or running run of ``kind`` whose config holds ``"key": key``, or ``None``."""
        self.reconcile()
        run_id = self._execute(lambda conn: self._active_id(conn, kind, key), write=False)
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
            found = self._active_id(conn, kind, key)
            if found is None:
                insert(conn)
            return found

        found = self._execute(join_or_insert, write=True)
        return self.get(found or new_id), found is None

    def get(self, run_id: str) -> RunRecord:
        """The run ``run_id``; an unknown id raises :class:`CfdebugError` naming close matches."""
        self.reconcile()

        def read(conn: sqlite3.Connection) -> RunRecord:
            row = conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs r WHERE r.run_id = ?", (run_id,)).fetchone()
            if row is None:
                raise self._unknown(conn, run_id)
            return self._record(row)

        return self._execute(read, write=False)

    def list(self, kind: str | None = None) -> list[RunRecord]:
        """All runs (of ``kind`` if given), newest first."""
        self.reconcile()
        where, args = ("WHERE r.kind = ?", (kind,)) if kind is not None else ("", ())

        def read(conn: sqlite3.Connection) -> list[RunRecord]:
            rows = conn.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs r {where} ORDER BY r.created DESC, r.rowid DESC", args
            ).fetchall()
            return [self._record(row) for row in rows]

        return self._execute(read, write=False)

    def set_status(self, run_id: str, status: str, *, error: str | None = None, pid: int | None = None) -> None:
        """Set the status of a run.

        ``error`` replaces the stored error message (``None`` clears it). ``pid`` (if given)
        records the process running the run, with this host's name and the process start time.
        """
        if status not in STATUSES:
            raise CfdebugError(
                f"Expected `status` to be one of {', '.join(STATUSES)}, but got {status!r}."
            )
        if pid is not None and not (isinstance(pid, int) and pid > 0):
            raise CfdebugError(f"Expected `pid` to be a positive integer, but got {pid!r}.")

        def update(conn: sqlite3.Connection) -> None:
            self._require(conn, run_id)
            conn.execute(
                "UPDATE runs SET status = ?, error = ?, updated = ? WHERE run_id = ?",
                (status, error, time.time(), run_id),
            )
            if pid is not None:
                _store_pid(conn, run_id, pid)

        self._execute(update, write=True)

    def log_progress(self, run_id: str, row: dict) -> None:
        """Append a progress row (e.g. ``{"epoch": 1, "step": 10, "loss": 0.3, "val_acc": 0.9}``).

        Stored in the ``progress`` table and appended as one line to ``run_dir/progress.jsonl``.
        Rows are stored as given (no timestamp is added; the table keeps one for its own use).
        """
        if not isinstance(row, dict):
            raise CfdebugError(f"Expected a progress row to be a dict, but got {type(row).__name__}.")
        text = _dumps(row, what="progress row")

        def insert(conn: sqlite3.Connection) -> None:
            self._require(conn, run_id)
            now = time.time()
            conn.execute("INSERT INTO progress (run_id, logged, row) VALUES (?, ?, ?)", (run_id, now, text))
            conn.execute("UPDATE runs SET updated = ? WHERE run_id = ?", (now, run_id))

        self._execute(insert, write=True)
        # After the commit, so a retried transaction never writes the line twice. One os.write on
        # an O_APPEND descriptor: concurrent writers' lines never interleave on a local disk.
        path = self.run_dir(run_id) / "progress.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (text + "\n").encode())
        finally:
            os.close(fd)

    def progress(self, run_id: str) -> list[dict]:
        """All progress rows of a run, oldest first."""

        def read(conn: sqlite3.Connection) -> list[dict]:
            self._require(conn, run_id)
            rows = conn.execute("SELECT row FROM progress WHERE run_id = ? ORDER BY id", (run_id,))
            return [_loads(r[0]) for r in rows]

        return self._execute(read, write=False)

    def timed_progress(self, run_id: str) -> list[tuple[float, dict]]:
        """All progress rows of a run with the time each was logged (epoch seconds), oldest first."""

        def read(conn: sqlite3.Connection) -> list[tuple[float, dict]]:
            self._require(conn, run_id)
            rows = conn.execute("SELECT logged, row FROM progress WHERE run_id = ? ORDER BY id", (run_id,))
            return [(float(t), _loads(r)) for t, r in rows]

        return self._execute(read, write=False)

    def set_result(self, run_id: str, result: dict) -> None:
        """Store the run's result, write ``run_dir/result.json`` atomically, set status ``done``."""
        if not isinstance(result, dict):
            raise CfdebugError(f"Expected a result to be a dict, but got {type(result).__name__}.")
        text = _dumps(result, what="result")

        def update(conn: sqlite3.Connection) -> None:
            self._require(conn, run_id)
            conn.execute(
                "UPDATE runs SET result = ?, status = 'done', error = NULL, updated = ? WHERE run_id = ?",
                (text, time.time(), run_id),
            )

        self._execute(update, write=True)
        write_text_atomic(self.run_dir(run_id) / "result.json", _dumps(result, what="result", indent=2) + "\n")

    def request_cancel(self, run_id: str) -> None:
        """Set the run's cancel flag (seen by :meth:`cancel_requested`); sends no signal."""

        def update(conn: sqlite3.Connection) -> None:
            self._require(conn, run_id)
            conn.execute(
                "UPDATE runs SET cancel_requested = 1, updated = ? WHERE run_id = ?", (time.time(), run_id)
            )

        self._execute(update, write=True)

    def cancel_requested(self, run_id: str) -> bool:
        """Whether a cancel was requested; one indexed read, cheap enough to call every step."""

        def read(conn: sqlite3.Connection) -> bool:
            return bool(self._require(conn, run_id)[5])

        return self._execute(read, write=False)

    def reconcile(self) -> list[str]:
        """Mark ``running`` runs whose process has ended as ``failed`` (or ``cancelled``).

        Only runs whose pid was recorded on this host are judged. A run whose cancel was
        requested becomes ``cancelled``; any other becomes ``failed`` with an error saying how to
        resume it. Returns the ids it changed.
        """
        host = socket.gethostname()

        def read(conn: sqlite3.Connection) -> list[tuple]:
            return conn.execute(
                "SELECT run_id, kind, pid, pid_start, argv FROM runs "
                "WHERE status = 'running' AND pid IS NOT NULL AND host = ?",
                (host,),
            ).fetchall()

        changed = []
        for run_id, kind, pid, pid_start, argv in self._execute(read, write=False):
            if _pid_alive(pid, pid_start):
                continue
            message = (
                "process ended without finishing (killed?); resume with "
                f"`{self.resume_command(run_id, kind, argv)}`"
            )

            def update(conn: sqlite3.Connection, run_id=run_id, pid=pid, message=message) -> bool:
                # Conditional on status and pid: the run may have finished (or been relaunched)
                # between the read above and this write; then it is left alone.
                cur = conn.execute(
                    "UPDATE runs SET status = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'failed' END, "
                    "error = CASE WHEN cancel_requested THEN 'cancelled on request' ELSE ? END, updated = ? "
                    "WHERE run_id = ? AND status = 'running' AND pid = ?",
                    (message, time.time(), run_id, pid),
                )
                return cur.rowcount > 0

            if self._execute(update, write=True):
                changed.append(run_id)
        return changed

    def resume_command(self, run_id: str, kind: str | None = None, argv: str | None = None) -> str:
        """The shell command that resumes a run: its launch argv if known, else the default CLI."""
        if argv:
            return shlex.join(_loads(argv))
        kind = kind or "treat"
        return shlex.join(
            ["python", "-m", "cfdebug", kind, "--config", str(self.run_dir(run_id) / "run.json"), "--run-id", run_id]
        )

    # ------------------------------------------------------------------ used by launch()
    def _begin_launch(self, run_id: str, argv: list[str]) -> None:
        def update(conn: sqlite3.Connection) -> None:
            _, _, status, pid, _, _ = self._require(conn, run_id)
            updated = conn.execute("SELECT updated FROM runs WHERE run_id = ?", (run_id,)).fetchone()[0]
            if status == "done":
                raise CfdebugError(
                    f"Expected a queued, failed or cancelled run to launch, but run {run_id!r} is "
                    "already done. Create a new run with the same config to run it again."
                )
            # A running run without a pid is being launched by someone else right now, unless stale.
            if status == "running" and (pid is not None or time.time() - updated < _STALE_LAUNCH_S):
                raise CfdebugError(
                    f"Expected a run that is not running, but run {run_id!r} is running "
                    f"({f'pid {pid}' if pid is not None else 'being launched'}). Wait for it, or cancel it first."
                )
            conn.execute(
                "UPDATE runs SET status = 'running', pid = NULL, pid_start = NULL, host = NULL, "
                "argv = ?, error = NULL, cancel_requested = 0, updated = ? WHERE run_id = ?",
                (json.dumps(argv), time.time(), run_id),
            )

        # reconcile first so a run whose process just died can be relaunched (resumed).
        self.reconcile()
        self._execute(update, write=True)

    def _record_pid(self, run_id: str, pid: int) -> None:
        self._execute(lambda conn: _store_pid(conn, run_id, pid), write=True)

    def _run_pid(self, run_id: str) -> tuple[int | None, str | None, str | None]:
        return self._execute(
            lambda conn: conn.execute(
                "SELECT pid, pid_start, host FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            or (None, None, None),
            write=False,
        )


# ---------------------------------------------------------------------- background runs
def launch(
    registry: RunRegistry,
    run_id: str,
    argv: list[str],
    env: dict | None = None,
    *,
    cwd: str | Path | None = None,
) -> int:
    """Start ``argv`` as a detached background process for run ``run_id``; return its pid.

    The run becomes ``running`` before the process starts (see the module docstring), its
    cancel flag and error are cleared, and the pid is recorded. The process gets a new session
    (``start_new_session=True``) so it survives the dashboard and :func:`cancel` can signal its
    whole process group; stdin is ``/dev/null``, stdout and stderr are appended to
    ``run_dir/log.txt``. A queued, failed or cancelled run can be launched (relaunching a failed
    one is how it resumes); a done or live running run cannot.

    Args:
        registry: the registry holding the run.
        run_id: the run to start (created with :meth:`RunRegistry.create`).
        argv: the command, e.g. ``[sys.executable, "-m", "cfdebug", "treat", "--config",
            str(rec.config_path), "--run-id", run_id]``.
        env: variables added to (overriding) this process's environment; unlike ``Popen``'s
            ``env`` it does not replace it. ``CFDEBUG_HOME`` (the registry's workdir),
            ``CFDEBUG_RUN_ID``, ``CFDEBUG_RUN_DIR`` and ``PYTHONUNBUFFERED=1`` are set unless
            ``env`` gives them.
        cwd: working directory of the child (default: this process's).
    """
    if not (isinstance(argv, (list, tuple)) and argv and all(isinstance(a, (str, os.PathLike)) for a in argv)):
        raise CfdebugError(f"Expected `argv` to be a non-empty list of strings, but got {argv!r}.")
    argv = [os.fspath(a) for a in argv]
    run_dir = registry.run_dir(run_id)
    registry._begin_launch(run_id, argv)

    child_env = dict(os.environ)
    child_env.update(
        {
            "CFDEBUG_HOME": str(registry.workdir),
            "CFDEBUG_RUN_ID": run_id,
            "CFDEBUG_RUN_DIR": str(run_dir),
            # Without it a Python child buffers its output and log.txt looks frozen.
            "PYTHONUNBUFFERED": "1",
        }
    )
    child_env.update({str(k): str(v) for k, v in (env or {}).items()})

    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "log.txt"
    try:
        with open(log_path, "ab") as log:
            # Appended, not truncated: a resumed run keeps the log of its earlier attempts.
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} launch: {shlex.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env,
                cwd=cwd,
                start_new_session=True,
                close_fds=True,
            )
    except OSError as exc:
        message = f"could not start {argv[0]!r}: {exc.strerror or exc}"
        registry.set_status(run_id, "failed", error=message)
        raise CfdebugError(
            f"Expected to start the run command, but {message}. Check the command and the working "
            "directory, then launch the run again."
        ) from exc

    registry._record_pid(run_id, proc.pid)
    # Reap the child when it exits so it does not linger as a zombie that still looks alive to
    # os.kill(pid, 0) for as long as the dashboard runs.
    threading.Thread(target=proc.wait, name=f"cfdebug-reap-{run_id}", daemon=True).start()
    return proc.pid


def start_background_run(workdir: str | Path, kind: str, spec: dict) -> str:
    """Register a run of ``kind`` (:data:`BACKGROUND_KINDS`) for ``spec`` and start it; return its id.

    A spec holding a ``key`` (a prepare spec, :func:`cfdebug.jobs.prepare_spec`) is deduplicated: while
    a queued or running run of ``kind`` has the same key, its id is returned and nothing new starts
    (:meth:`RunRegistry.create_or_join`).

    The child runs the command a user would type, the same way for every kind:
    ``python -m cfdebug <kind> --config RUN_DIR/run.json --run-id ID --workdir WORKDIR --quiet``
    (ending in :func:`cfdebug.jobs.run_treat_job`, :func:`~cfdebug.jobs.run_xcr_job` or
    :func:`~cfdebug.jobs.run_prepare_job`), with this
    interpreter, this process's working directory (relative paths in ``spec`` mean the same) and
    :data:`PACKAGE_ROOT` first on ``PYTHONPATH``, so it imports this copy of cfdebug even when it
    is not installed. ``spec`` is the kind's spec (:func:`cfdebug.jobs.treat_spec`,
    :func:`~cfdebug.jobs.xcr_spec`). See :func:`launch` for the process and its log.
    """
    if kind not in BACKGROUND_KINDS:
        raise CfdebugError(f"Expected `kind` to be one of {', '.join(BACKGROUND_KINDS)}, but got {kind!r}.")
    registry = RunRegistry(workdir)
    if isinstance(spec, dict) and "key" in spec:
        record, created = registry.create_or_join(kind, spec)
        if not created:
            return record.run_id  # the same artifact is being made already: wait for that run
    else:
        record = registry.create(kind, spec)
    argv = [sys.executable, "-m", "cfdebug", kind, "--config", str(record.config_path), "--run-id", record.run_id,
            "--workdir", str(registry.workdir), "--quiet"]
    path = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    launch(registry, record.run_id, argv, env={"PYTHONPATH": path})
    return record.run_id


def cancel(registry: RunRegistry, run_id: str) -> RunRecord:
    """Ask a run to stop: set its cancel flag and ``SIGTERM`` its process group if alive.

    Does not wait. A queued run (never launched) becomes ``cancelled`` at once; a finished run is
    left as it is. A running child ends as ``cancelled`` itself (see :func:`run_context`), or, if
    the signal kills it first, :meth:`RunRegistry.reconcile` marks it ``cancelled``. A run on
    another host only gets the flag, which its process polls between steps. Returns the record.
    """
    rec = registry.get(run_id)
    if rec.finished:
        return rec
    registry.request_cancel(run_id)
    if rec.status == "queued":
        # Nothing runs it yet; only flip it if still queued (a launch may have raced us).
        registry._execute(
            lambda conn: conn.execute(
                "UPDATE runs SET status = 'cancelled', error = 'cancelled before it started', updated = ? "
                "WHERE run_id = ? AND status = 'queued'",
                (time.time(), run_id),
            ),
            write=True,
        )
        return registry.get(run_id)
    pid, pid_start, host = registry._run_pid(run_id)
    if pid is None and time.time() - rec.updated > _STALE_LAUNCH_S:
        # Its launcher died before recording a pid (see _STALE_LAUNCH_S): nothing to signal.
        _finish_if_running(registry, run_id, "cancelled", "cancelled on request")
    if pid is not None and host == socket.gethostname() and _pid_alive(pid, pid_start):
        try:
            os.killpg(os.getpgid(pid), signal.SIGTERM)
        except ProcessLookupError:
            pass  # ended between the check and the signal; reconcile() records it
        except PermissionError as exc:
            raise CfdebugError(
                f"Expected to be allowed to stop run {run_id!r} (pid {pid}), but the system refused "
                f"({exc.strerror}); it belongs to another user. Stop it as that user; the cancel "
                "flag is set, so it stops by itself at its next step."
            ) from exc
    return registry.get(run_id)


# ---------------------------------------------------------------------- time left
def seconds_left(points, now: float | None = None) -> float | None:
    """Seconds until a job's fraction reaches 1, from the throughput it measured so far.

    ``points`` are ``(time, fraction)`` pairs, oldest first (epoch seconds, fraction in [0, 1]),
    e.g. a stage's rows of :meth:`RunRegistry.timed_progress`. Only the points after the last
    drop of the fraction count (a drop starts a new stage). The rate is the fraction gained
    between the first and the last of them over the time it took; the estimate is what remains
    at that rate, less the time since the last point (``now``, default ``time.time()``), and
    never below 0. ``None`` while nothing has been measured (fewer than two points, no time
    passed or no progress).
    """
    pts = [(float(t), min(max(float(f), 0.0), 1.0)) for t, f in points]
    for i in range(len(pts) - 1, 0, -1):
        if pts[i][1] < pts[i - 1][1]:
            pts = pts[i:]
            break
    if len(pts) < 2:
        return None
    (t0, f0), (t1, f1) = pts[0], pts[-1]
    if t1 <= t0 or f1 <= f0:
        return None
    now = time.time() if now is None else float(now)
    left = (1.0 - f1) * (t1 - t0) / (f1 - f0) - max(now - t1, 0.0)
    return max(left, 0.0)


def describe_seconds_left(seconds: float | None) -> str:
    """``"about 40 s left"``-style text for :func:`seconds_left` (``""`` when unknown)."""
    if seconds is None:
        return ""
    if seconds < 10:
        return "a few seconds left"
    if seconds < 90:
        return f"about {int(5 * round(seconds / 5))} s left"
    if seconds < 90 * 60:
        return f"about {int(round(seconds / 60))} min left"
    return f"about {seconds / 3600:.1f} h left"


# ---------------------------------------------------------------------- inside a run process
def check_cancel(registry: RunRegistry, run_id: str) -> None:
    """Raise :class:`RunCancelled` if the run's cancel was requested (call between steps)."""
    if registry.cancel_requested(run_id):
        raise RunCancelled(f"run {run_id!r} was cancelled")


@contextmanager
def run_context(registry: RunRegistry, run_id: str, *, handle_sigterm: bool = True) -> Iterator[None]:
    """The status bookkeeping of a run process; wrap the training loop in it.

    On entry the run is marked ``running`` and, unless a live launcher pid is already recorded,
    this process's pid is recorded (so a run started by hand is reconciled too). In the main
    thread ``SIGTERM`` (sent by :func:`cancel`) raises :class:`RunCancelled`. On exit:

    * :class:`RunCancelled` or ``KeyboardInterrupt`` → ``cancelled`` (not re-raised for
      :class:`RunCancelled`, so the process exits 0);
    * any other exception → ``failed`` with the error and a resume hint, re-raised;
    * normal exit while still ``running`` (no :meth:`RunRegistry.set_result`) → ``done``.

    Example::

        with run_context(reg, run_id):
            for step in ...:
                check_cancel(reg, run_id)
                reg.log_progress(run_id, {"step": step, "loss": loss})
            reg.set_result(run_id, {"val_acc": acc})
    """
    pid, pid_start, host = registry._run_pid(run_id)
    _refuse_if_running_elsewhere(registry, run_id, pid, pid_start, host)
    own_pid = None
    if pid is None or host != socket.gethostname() or not _pid_alive(pid, pid_start):
        own_pid = os.getpid()
    registry.set_status(run_id, "running", pid=own_pid)

    previous = None
    installed = False
    if handle_sigterm and threading.current_thread() is threading.main_thread():

        def on_sigterm(signum, frame):
            raise RunCancelled(f"run {run_id!r} received SIGTERM")

        previous = signal.signal(signal.SIGTERM, on_sigterm)
        installed = True
    try:
        yield
    except (RunCancelled, KeyboardInterrupt) as exc:
        _finish_if_running(registry, run_id, "cancelled", "cancelled on request")
        if isinstance(exc, KeyboardInterrupt):
            raise
    except SystemExit as exc:
        if exc.code in (0, None):
            _finish_if_running(registry, run_id, "done", None)
        else:
            _finish_if_running(registry, run_id, "failed", f"exited with status {exc.code!r}")
        raise
    except BaseException as exc:
        rec_kind = registry.get(run_id).kind
        _finish_if_running(
            registry,
            run_id,
            "failed",
            f"{type(exc).__name__}: {exc}; resume with `{registry.resume_command(run_id, rec_kind)}`",
        )
        raise
    else:
        _finish_if_running(registry, run_id, "done", None)
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous)


def _refuse_if_running_elsewhere(registry: RunRegistry, run_id: str, pid, pid_start, host) -> None:
    """Refuse to run ``run_id`` while another live process on this host owns it (a second
    ``--resume`` would train the same run folder twice). The owner is this process, or the
    process :func:`launch` started or one of its children (``torchrun``'s workers)."""
    status = registry._execute(
        lambda conn: (conn.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone() or (None,))[0],
        write=False,
    )
    if status != "running" or pid is None or host != socket.gethostname() or not _pid_alive(pid, pid_start):
        return
    if _is_self_or_ancestor(pid):
        return
    raise CfdebugError(
        f"Expected a run that is not running, but run {run_id!r} is still running (pid {pid}). Wait for "
        f"it to finish, or cancel it first (`python -m cfdebug runs --cancel {run_id}`), then resume it."
    )


def _finish_if_running(registry: RunRegistry, run_id: str, status: str, error: str | None) -> None:
    # Conditional: set_result() may already have made it done; never overwrite a final status.
    registry._execute(
        lambda conn: conn.execute(
            "UPDATE runs SET status = ?, error = ?, updated = ? WHERE run_id = ? AND status = 'running'",
            (status, error, time.time(), run_id),
        ),
        write=True,
    )


# ---------------------------------------------------------------------- helpers
def _is_busy(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        # Primary result codes live in the low byte: SQLITE_BUSY = 5, SQLITE_LOCKED = 6.
        return (code & 0xFF) in (5, 6)
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def _check_name(what: str, value: Any) -> None:
    if not (isinstance(value, str) and _ID_PATTERN.match(value)):
        raise CfdebugError(
            f"Expected `{what}` to be 1-128 letters, digits, '.', '_' or '-' (starting with a letter "
            f"or digit; it names a folder), but got {value!r}."
        )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist") and callable(obj.tolist):  # NumPy arrays/scalars, tensors
        return obj.tolist()
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _dumps(value: Any, *, what: str, indent: int | None = None) -> str:
    try:
        # allow_nan=True (the default, spelled out): NaN/Infinity survive as bare literals.
        return json.dumps(value, allow_nan=True, default=_json_default, indent=indent)
    except (TypeError, ValueError) as exc:
        raise CfdebugError(
            f"Expected the {what} to hold only JSON values (numbers, strings, lists, dicts), but "
            f"{exc}. Convert it (e.g. float(x), str(path)) before passing it."
        ) from exc


def _loads(text: str) -> Any:
    return json.loads(text)


def _is_self_or_ancestor(pid: int) -> bool:
    """Whether ``pid`` is this process or one of its parents (Linux ``/proc``; elsewhere the
    direct parent only). ``torchrun`` puts its workers in their own sessions, so the process
    group does not tell."""
    current = os.getpid()
    for _ in range(64):
        if current == pid:
            return True
        if current == os.getpid():
            current = os.getppid()
            continue
        stat = _proc_stat(current)
        if stat is None:
            return False
        current = stat.ppid
        if current <= 1:
            return False
    return False


class _ProcStat(NamedTuple):
    state: str  # field 3
    ppid: int  # field 4
    start: str  # field 22, starttime in clock ticks


def _proc_stat(pid: int) -> _ProcStat | None:
    """State, parent pid and start time from ``/proc/<pid>/stat`` on Linux; ``None`` where unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses; fields resume after the last ')'.
    fields = text[text.rfind(")") + 2 :].split()
    if len(fields) < 20 or not fields[1].lstrip("-").isdigit():
        return None
    return _ProcStat(fields[0], int(fields[1]), fields[19])


def _pid_alive(pid: int | None, pid_start: str | None = None) -> bool:
    """Whether ``pid`` is a live (non-zombie) process, and the same one if ``pid_start`` is known."""
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    stat = _proc_stat(pid)
    if stat is not None:
        state, _, start = stat
        if state in ("Z", "X"):
            return False
        if pid_start is not None and start != pid_start:
            return False  # the pid was reused by an unrelated process
    return True


def _store_pid(conn: sqlite3.Connection, run_id: str, pid: int) -> None:
    stat = _proc_stat(pid)
    conn.execute(
        "UPDATE runs SET pid = ?, pid_start = ?, host = ?, updated = ? WHERE run_id = ?",
        (pid, stat.start if stat else None, socket.gethostname(), time.time(), run_id),
    )
