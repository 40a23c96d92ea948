"""What the operating system says about a process: is it alive, is it the same process, is it
one of ours.

A process is named by ``(pid, start time, host)``: a pid alone is not enough, since a zombie still
answers ``os.kill(pid, 0)`` and a finished process's pid may be reused by an unrelated one, so the
start time (field 22 of Linux ``/proc/<pid>/stat``, in clock ticks since boot) is compared too.
Only processes on this host (:func:`this_host`) can be judged. Two users: the run registry (a
run's owner, the resume lock) and the store (a temporary folder whose writer died,
:meth:`cfdebug.store.Store.sweep`). POSIX only; where ``/proc`` is missing the checks fall back to
``os.kill`` and the parent pid.
"""

from __future__ import annotations

import os
import socket
from typing import NamedTuple

__all__ = ["ProcStat", "proc_stat", "pid_alive", "is_self_or_ancestor", "this_host"]


class ProcStat(NamedTuple):
    state: str  # field 3
    ppid: int  # field 4
    start: str  # field 22, starttime in clock ticks


def this_host() -> str:
    """The host name a run's pid is recorded with."""
    return socket.gethostname()


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


def is_self_or_ancestor(pid: int) -> bool:
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
        stat = proc_stat(current)
        if stat is None:
            return False
        current = stat.ppid
        if current <= 1:
            return False
    return False
