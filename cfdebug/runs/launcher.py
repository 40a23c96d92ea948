"""Process control of background runs: launch, the dashboard's launcher, cancel, the resume lock.

* **When a run becomes "running"**: :func:`launch` sets ``running`` itself, *before* the child
  starts, and then records the child's pid. So the dashboard shows the run at once, and a child
  that dies before it reports anything (an import error, a bad argument) is still caught by
  :meth:`RunRegistry.reconcile`. Setting the status before ``Popen`` (not after) means a very fast
  child that finishes first can never have its ``done`` overwritten by ``running``. A run started
  by hand (no :func:`launch`) marks itself running through :func:`cfdebug.runs.run_context`.
* **How a cancel is seen**: :func:`cancel` sets a flag in the registry and sends ``SIGTERM`` to
  the run's process group (runs are started in a new session, so ``torchrun`` and its workers
  all get it). A child inside :func:`~cfdebug.runs.run_context` turns ``SIGTERM`` into
  :class:`~cfdebug.runs.RunCancelled` and ends as ``cancelled``; it also polls
  :meth:`RunRegistry.cancel_requested` between steps, which covers runs on another host and
  children that ignore signals. A child that dies from the signal without reporting is marked
  ``cancelled`` (not ``failed``) by :meth:`RunRegistry.reconcile`, because the flag says it was
  asked to stop.
* **The resume lock**: :func:`refuse_if_running_elsewhere` keeps a second ``--resume`` of a run
  from training the same run folder while the first still runs.

POSIX only (process groups, ``start_new_session``).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..errors import CfdebugError
from ..procs import is_self_or_ancestor, pid_alive, this_host
from .registry import RunRecord, RunRegistry

__all__ = ["BACKGROUND_KINDS", "PACKAGE_ROOT", "launch", "start_background_run", "cancel", "refuse_if_running_elsewhere"]

#: The run kinds :func:`start_background_run` starts (each a ``python -m cfdebug <kind>`` command).
BACKGROUND_KINDS = ("treat", "xcr", "revise", "prepare")
#: The folder holding the ``cfdebug`` package; put first on a child's PYTHONPATH so it imports this copy.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def launch(registry: RunRegistry, run_id: str, argv: list[str], env: dict | None = None, *, cwd: str | Path | None = None) -> int:
    """Start ``argv`` as a detached background process for run ``run_id``; return its pid.

    The run becomes ``running`` before the process starts (:meth:`RunRegistry.begin_launch`), its
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
    registry.begin_launch(run_id, argv)
    child_env = dict(os.environ)
    # PYTHONUNBUFFERED: without it a Python child buffers its output and log.txt looks frozen.
    child_env.update({"CFDEBUG_HOME": str(registry.workdir), "CFDEBUG_RUN_ID": run_id, "CFDEBUG_RUN_DIR": str(run_dir), "PYTHONUNBUFFERED": "1"})
    child_env.update({str(k): str(v) for k, v in (env or {}).items()})
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with open(run_dir / "log.txt", "ab") as log:
            # Appended, not truncated: a resumed run keeps the log of its earlier attempts.
            log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} launch: {shlex.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=child_env, cwd=cwd,
                                    start_new_session=True, close_fds=True)
    except OSError as exc:
        message = f"could not start {argv[0]!r}: {exc.strerror or exc}"
        registry.set_status(run_id, "failed", error=message)
        raise CfdebugError(
            f"Expected to start the run command, but {message}. Check the command and the working "
            "directory, then launch the run again."
        ) from exc
    registry.record_pid(run_id, proc.pid)
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
    :func:`~cfdebug.jobs.run_prepare_job`), with this interpreter, this process's working
    directory (relative paths in ``spec`` mean the same) and :data:`PACKAGE_ROOT` first on
    ``PYTHONPATH``, so it imports this copy of cfdebug even when it is not installed. ``spec`` is
    the kind's spec (:func:`cfdebug.jobs.treat_spec`, :func:`~cfdebug.jobs.xcr_spec`). See
    :func:`launch` for the process and its log.
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
    left as it is. A running child ends as ``cancelled`` itself (see
    :func:`~cfdebug.runs.run_context`), or, if the signal kills it first,
    :meth:`RunRegistry.reconcile` marks it ``cancelled``. A run on another host only gets the
    flag, which its process polls between steps. Returns the record.
    """
    rec = registry.get(run_id)
    if rec.finished:
        return rec
    registry.request_cancel(run_id)
    if rec.status == "queued":
        registry.cancel_if_queued(run_id)  # nothing runs it yet (unless a launch raced us)
        return registry.get(run_id)
    if rec.launch_lost:
        registry.finish_if_running(run_id, "cancelled", "cancelled on request")  # nothing to signal
    process = registry.process_of(run_id)
    if owned_here(process):
        try:
            os.killpg(os.getpgid(process.pid), signal.SIGTERM)
        except ProcessLookupError:
            pass  # ended between the check and the signal; reconcile() records it
        except PermissionError as exc:
            raise CfdebugError(
                f"Expected to be allowed to stop run {run_id!r} (pid {process.pid}), but the system refused "
                f"({exc.strerror}); it belongs to another user. Stop it as that user; the cancel "
                "flag is set, so it stops by itself at its next step."
            ) from exc
    return registry.get(run_id)


def refuse_if_running_elsewhere(registry: RunRegistry, run_id: str) -> None:
    """Refuse to run ``run_id`` while another live process on this host owns it (a second
    ``--resume`` would train the same run folder twice). The owner may be this process, or the
    process :func:`launch` started or one of its children (``torchrun``'s workers)."""
    process = registry.process_of(run_id)
    if process.status != "running" or not owned_here(process):
        return
    if is_self_or_ancestor(process.pid):
        return
    raise CfdebugError(
        f"Expected a run that is not running, but run {run_id!r} is still running (pid {process.pid}). Wait for "
        f"it to finish, or cancel it first (`python -m cfdebug runs --cancel {run_id}`), then resume it."
    )


def owned_here(process) -> bool:
    """Whether a run's recorded process (:meth:`RunRegistry.process_of`) is a live process of this host."""
    return process.pid is not None and process.host == this_host() and pid_alive(process.pid, process.pid_start)
