"""Inside a run process: the status bookkeeping (:func:`run_context`) and the cancel checks."""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from ..errors import CfdebugError
from .launcher import owned_here, refuse_if_running_elsewhere
from .registry import RunRegistry

__all__ = ["RunCancelled", "run_context", "check_cancel"]


class RunCancelled(Exception):
    """Raised inside a run process when its cancel was requested (flag or SIGTERM)."""


def check_cancel(registry: RunRegistry, run_id: str) -> None:
    """Raise :class:`RunCancelled` if the run's cancel was requested (call between steps)."""
    if registry.cancel_requested(run_id):
        raise RunCancelled(f"run {run_id!r} was cancelled")


@contextmanager
def run_context(registry: RunRegistry, run_id: str, *, handle_sigterm: bool = True) -> Iterator[None]:
    """The status bookkeeping of a run process; wrap the training loop in it.

    On entry a run that another live process of this host still runs is refused
    (:func:`~cfdebug.runs.launcher.refuse_if_running_elsewhere`); the run is marked ``running``
    and, unless a live launcher pid is already recorded, this process's pid is recorded (so a run
    started by hand is reconciled too). In the main thread ``SIGTERM`` (sent by
    :func:`~cfdebug.runs.cancel`) raises :class:`RunCancelled`. On exit:

    * :class:`RunCancelled` or ``KeyboardInterrupt`` → ``cancelled`` (not re-raised for
      :class:`RunCancelled`, so the process exits 0);
    * a user mistake (:class:`~cfdebug.errors.CfdebugError`) → ``failed`` with its own message,
      said once (no resume hint: resuming repeats the mistake), re-raised;
    * any other exception → ``failed`` with the error and a resume hint, re-raised;
    * normal exit while still ``running`` (no :meth:`RunRegistry.set_result`) → ``done``.

    A status set inside (a diverged run's message, a result) is never overwritten. Example::

        with run_context(reg, run_id):
            for step in ...:
                check_cancel(reg, run_id)
                reg.log_progress(run_id, progress_row(step / steps, "train", f"step {step}"))
            reg.set_result(run_id, {"val_acc": acc})
    """
    refuse_if_running_elsewhere(registry, run_id)
    registry.set_status(run_id, "running", pid=None if owned_here(registry.process_of(run_id)) else os.getpid())
    previous, installed = None, False
    if handle_sigterm and threading.current_thread() is threading.main_thread():

        def on_sigterm(signum, frame):
            raise RunCancelled(f"run {run_id!r} received SIGTERM")

        previous, installed = signal.signal(signal.SIGTERM, on_sigterm), True
    try:
        yield
    except (RunCancelled, KeyboardInterrupt) as exc:
        registry.finish_if_running(run_id, "cancelled", "cancelled on request")
        if isinstance(exc, KeyboardInterrupt):
            raise
    except SystemExit as exc:
        clean = exc.code in (0, None)
        registry.finish_if_running(run_id, "done" if clean else "failed", None if clean else f"exited with status {exc.code!r}")
        raise
    except CfdebugError as exc:
        registry.finish_if_running(run_id, "failed", str(exc))
        raise
    except BaseException as exc:
        hint = registry.resume_command(run_id, registry.get(run_id).kind)
        registry.finish_if_running(run_id, "failed", f"{type(exc).__name__}: {exc}; resume with `{hint}`")
        raise
    else:
        registry.finish_if_running(run_id, "done", None)
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous)
