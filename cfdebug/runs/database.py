"""The SQLite plumbing of the run registry: schema, connections, retries, JSON columns.

* **Concurrency**: one fresh connection per operation (``sqlite3`` connections must not cross
  threads, and Streamlit runs each script in its own thread), WAL so readers never block the
  writer, ``busy_timeout`` plus an outer retry with exponential backoff (``lock_timeout_s``,
  default 10 s), and every write in a short ``BEGIN IMMEDIATE`` transaction so two writers queue
  up instead of deadlocking on a read-to-write upgrade.
* **JSON columns**: config, progress rows and results are stored as JSON text written by the
  one encoder, :func:`cfdebug.store.json_text` with ``keep_nan=True``: ``NaN``, ``Infinity``
  and ``-Infinity`` are kept as those bare literals and come back as floats (``json.loads``), so
  a diverged loss survives the round trip (the registry writes them in :mod:`.registry`).
* **Read-only**: a workdir that cannot be written (a read-only mount, a folder without write
  permission) is opened read-only: no file is created, no schema written, and a write raises
  :class:`~cfdebug.errors.CfdebugError`. SQLite's ``mode=ro`` reads a WAL database only where its
  ``-wal``/``-shm`` files exist or can be created; where they can be neither (the last writer
  closed cleanly, then the disk became read-only) the file is opened ``immutable=1``, which is
  safe exactly then: no one can be writing it, and with no ``-wal`` every commit is in the file.
  A missing ``runs.db`` reads as an empty registry.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Callable

from ..errors import CfdebugError

__all__ = ["DEFAULT_LOCK_TIMEOUT_S", "RunDatabase"]

DEFAULT_LOCK_TIMEOUT_S = 10.0
# One attempt waits at most this long inside SQLite's own busy handler before the outer retry
# loop backs off and tries again; keeps the total wait close to the budget.
_ATTEMPT_TIMEOUT_S = 2.0
_SCHEMA_VERSION = 1

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


class RunDatabase:
    """``runs.db`` of one workdir: every operation on a fresh connection, retried while busy.

    Args:
        db_path: the database file (created, in WAL mode, with the schema, if needed).
        runs_dir: the run directories' folder (named in the message about a damaged database).
        lock_timeout_s: how long an operation waits for another process's lock, with backoff,
            before raising :class:`~cfdebug.errors.CfdebugError`.
        read_only: open it for reading only (nothing created or written; see the module's notes).
    """

    def __init__(self, db_path: Path, runs_dir: Path, lock_timeout_s: float, *, read_only: bool = False):
        self.db_path, self.runs_dir, self.lock_timeout_s = db_path, runs_dir, float(lock_timeout_s)
        self.read_only = bool(read_only)
        if not self.read_only:
            self._init_schema()

    def _connect(self, timeout: float) -> sqlite3.Connection:
        if self.read_only:
            return self._connect_read_only(timeout)
        # isolation_level=None: no implicit transactions, so writes use our BEGIN IMMEDIATE.
        conn = sqlite3.connect(self.db_path, timeout=timeout, isolation_level=None)
        # synchronous=NORMAL is durable enough in WAL mode (a power cut may lose the last commits,
        # never corrupts) and avoids an fsync per progress row.
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _connect_read_only(self, timeout: float) -> sqlite3.Connection:
        """A connection that cannot write: ``mode=ro``, else ``immutable=1`` where the WAL's
        ``-shm`` cannot be created; an empty in-memory registry when there is no ``runs.db``."""
        if not self.db_path.exists():
            conn = sqlite3.connect(":memory:", isolation_level=None)
            self._create_tables(conn)
            return conn
        uri = self.db_path.resolve().as_uri()  # file:///…, with any %, ? or # in the path escaped
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=timeout, isolation_level=None)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # opening is lazy: the WAL index is needed here
            return conn
        except sqlite3.OperationalError as exc:
            conn.close()
            if not _is_cannot_open(exc):
                raise
        return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, timeout=timeout, isolation_level=None)

    def execute(self, fn: Callable[[sqlite3.Connection], Any], *, write: bool) -> Any:
        """Run ``fn(conn)`` on a fresh connection, in a ``BEGIN IMMEDIATE`` transaction if ``write``.

        Retries the whole operation with exponential backoff while the database is busy, up to
        ``lock_timeout_s``; nothing is committed by a failed attempt, so a retry is safe. A write
        to a read-only registry raises :class:`~cfdebug.errors.CfdebugError`.
        """
        if write and self.read_only:
            raise CfdebugError(
                f"Expected a writable run registry to change a run, but {self.db_path} is opened read-only "
                "(its work directory cannot be written). Make the work directory writable, or run the "
                "command where it is."
            )
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.02
        while True:
            remaining = deadline - time.monotonic()
            try:
                with closing(self._connect(max(0.05, min(_ATTEMPT_TIMEOUT_S, remaining)))) as conn:
                    return _transaction(conn, fn) if write else fn(conn)
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

    def _init_schema(self) -> None:
        def setup(conn: sqlite3.Connection) -> None:
            # journal_mode=WAL is persistent in the file; setting it needs no transaction.
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot switch runs.db to WAL (got {mode})")
            _transaction(conn, self._create_tables)

        self.execute(setup, write=False)

    def _create_tables(self, conn: sqlite3.Connection) -> None:
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


def _transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any]) -> Any:
    """``fn(conn)`` inside ``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any exception."""
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


def _is_cannot_open(exc: BaseException) -> bool:
    """SQLITE_CANTOPEN (14): e.g. a WAL database whose ``-shm`` file cannot be created."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) == 14
    return "unable to open" in str(exc).lower()


def _is_busy(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        # Primary result codes live in the low byte: SQLITE_BUSY = 5, SQLITE_LOCKED = 6.
        return (code & 0xFF) in (5, 6)
    text = str(exc).lower()
    return "locked" in text or "busy" in text
