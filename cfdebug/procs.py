"""Whether the process that left something behind still runs.

A process is named by its pid and its start time (``/proc/<pid>/stat`` field 22, in clock ticks
since boot): a pid alone may have been reused by an unrelated process after a crash. The store
uses this to tell a temporary folder that a live writer is still filling from one a killed
process left (:meth:`cfdebug.store.Store.sweep`). The run registry's resume lock uses the same
check (``cfdebug.runs._pid_alive`` holds the same lines until it imports these).
"""

from __future__ import annotations

import os
from typing import NamedTuple


class ProcStat(NamedTuple):
    state: str  # field 3
    ppid: int  # field 4
    start: str  # field 22, starttime in clock ticks


def proc_stat(pid: int) -> ProcStat | None:
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
    return ProcStat(fields[0], int(fields[1]), fields[19])


def pid_alive(pid: int | None, pid_start: str | None = None) -> bool:
    """Whether ``pid`` is a live (non-zombie) process, and the same one if ``pid_start`` is known."""
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process; a pid beyond any pid's range
        return False
    except PermissionError:
        pass  # exists, owned by another user
    stat = proc_stat(pid)
    if stat is not None:
        if stat.state in ("Z", "X"):
            return False
        if pid_start is not None and stat.start != pid_start:
            return False  # the pid was reused by an unrelated process
    return True
