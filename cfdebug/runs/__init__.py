"""Runs: the registry, background processes, the in-run bookkeeping and progress.

A long job (training the model, a treatment sweep, an XCR report) runs as a *run*: a row in the
SQLite registry of the workdir (``WORKDIR/runs.db``) and a folder ``WORKDIR/runs/<run_id>/``.
A background run is a separate OS process running the same command a user can type,
``python -m cfdebug <kind> --config RUN_DIR/run.json --run-id ID``. Its life cycle::

    registered (queued) ─► launched (running) ─► progress rows … ─► done | failed | cancelled
        RunRegistry.create     launch()              RunStages /        set_result, run_context,
        start_background_run   run_context()         the engine         reconcile(), cancel()

=========================  ========================================================================
:mod:`.registry`           :class:`RunRegistry` (runs and progress rows), :class:`RunRecord`,
                           statuses, crash detection (:meth:`~RunRegistry.reconcile`)
:mod:`.database`           the SQLite plumbing: schema, connections (read-only for a read-only
                           workdir), retries
:mod:`.launcher`           process control: :func:`launch`, :func:`start_background_run`,
                           :func:`cancel`, the resume lock
:mod:`.context`            inside a run process: :func:`run_context`, :func:`check_cancel`,
                           :class:`RunCancelled`
:mod:`.progress`           the progress row, its writer (:class:`RunStages`), its reader
                           (:func:`progress_of`) and the measured time left
=========================  ========================================================================

What the OS says about a run's pid (alive, the same process, an ancestor) is :mod:`cfdebug.procs`.
"""

from .context import RunCancelled, check_cancel, run_context
from .launcher import BACKGROUND_KINDS, PACKAGE_ROOT, cancel, launch, start_background_run
from .progress import RunProgress, RunStages, describe_seconds_left, progress_of, progress_row, read_progress, seconds_left
from .registry import FINISHED_STATUSES, LIST_RUNS_HINT, STATUSES, RunRecord, RunRegistry

__all__ = [
    "STATUSES",
    "FINISHED_STATUSES",
    "LIST_RUNS_HINT",
    "BACKGROUND_KINDS",
    "PACKAGE_ROOT",
    "RunRecord",
    "RunRegistry",
    "RunCancelled",
    "launch",
    "start_background_run",
    "cancel",
    "run_context",
    "check_cancel",
    "progress_row",
    "RunStages",
    "RunProgress",
    "read_progress",
    "progress_of",
    "seconds_left",
    "describe_seconds_left",
]
