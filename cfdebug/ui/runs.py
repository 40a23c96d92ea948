"""The dashboard's runs: the one run monitor every run kind shows, the runs of a workspace, and
what a page says about a run that failed.

A background run (:mod:`cfdebug.runs`) is watched the same way whatever its kind (prepare,
treat, xcr). :func:`run_monitor` polls it in a fragment and draws a progress bar with the step,
the stage's message and the measured time left (read by :func:`cfdebug.runs.progress_of`, worded
by :meth:`cfdebug.runs.RunProgress.describe`), a page's extras drawn from the same reading (the
treatment page's per-epoch curves), a Cancel button and the tail of the run's log. When the run
ends the whole page reruns and draws its result, or its error through the one error box
(:func:`show_run_outcome`).

In read-only mode (``serve --read-only``) a visitor sees the bar but no Cancel button and no
log, and a failed run's error is replaced by a fixed sentence: logs and errors name server
paths (the run folder, a missing dataset folder).
"""

from __future__ import annotations

import re
import time
from typing import Callable

import streamlit as st

from ..access import read_only
from ..config import config_dict
from ..errors import CfdebugError
from .errors import show_error, show_user_error

__all__ = ["POLL_S", "workspace_runs", "progress", "start_run", "resume_command", "run_failure", "show_run_outcome", "run_monitor", "watch_runs"]

#: Seconds between two polls of a running run.
POLL_S = 1.0
#: Lines of the run's log the monitor shows.
LOG_LINES = 40
#: What a read-only visitor is told about a failed run (its error names server paths).
READ_ONLY_FAILURE = "Run `{run_id}` {status}. The details are shown to whoever runs this dashboard (it is read-only)."


def _registry(workdir):
    from ..runs import RunRegistry

    return RunRegistry(workdir)


def workspace_runs(ws, kind: str) -> list:
    """The runs of ``kind`` on this workspace's model and data, newest first: the one list of a
    workspace's runs every page shows (:class:`cfdebug.runs.RunRecord`)."""
    mine = config_dict(ws.config)
    try:
        records = _registry(ws.config.workdir).list(kind)
    except CfdebugError as exc:
        show_user_error(exc)
    same = lambda stored: stored.get("model") == mine["model"] and stored.get("data") == mine["data"]  # noqa: E731
    return [r for r in records if isinstance((r.config or {}).get("workspace"), dict) and same(r.config["workspace"])]


def progress(ws, record):
    """Where an active run stands (:func:`cfdebug.runs.progress_of`), ``None`` for a finished one."""
    from ..runs import progress_of

    return progress_of(_registry(ws.config.workdir), record.run_id) if record.active else None


def start_run(ws, kind: str, spec: dict) -> str:
    """Start a background run of ``kind`` for ``spec`` (:func:`cfdebug.runs.start_background_run`);
    its id. A mistake shows as an error and stops the page."""
    from ..runs import start_background_run

    try:
        return start_background_run(ws.config.workdir, kind, spec)
    except CfdebugError as exc:
        show_user_error(exc)


def resume_command(record, workdir) -> str:
    """The command that resumes ``record`` from its last checkpoint, naming the workdir the run
    lives in (``python -m cfdebug treat --resume ID --workdir W``)."""
    import shlex

    return shlex.join(["python", "-m", "cfdebug", record.kind, "--resume", record.run_id, "--workdir", str(workdir)])


_RESUME_HINT = re.compile(r";? ?resume (?:it )?with:? `[^`]*`")


def run_failure(record, what: str | None = None, workdir=None) -> str:
    """What a page says about a failed or cancelled run: its error, or in read-only mode
    :data:`READ_ONLY_FAILURE` (no server paths). A resume hint in the error is replaced by
    :func:`resume_command` for ``workdir`` (a run registered from a terminal stores one without
    its workdir)."""
    if read_only():
        return READ_ONLY_FAILURE.format(run_id=record.run_id, status=record.status)
    error = record.error or "no message"
    if workdir is not None and _RESUME_HINT.search(error) and record.kind != "prepare":
        error = _RESUME_HINT.sub("", error) + f"; resume with `{resume_command(record, workdir)}`"
    return f"{what + ': ' if what else ''}the background run `{record.run_id}` {record.status}: {error}"


def show_run_outcome(record, workdir=None) -> None:
    """A finished run that did not end well: a failed one's error through the error box, a
    cancelled one as a note."""
    if record.status == "failed" or record.status == "unreadable":
        show_error(run_failure(record, workdir=workdir))
    elif record.status == "cancelled":
        st.info(f"Run `{record.run_id}` was cancelled.", icon=":material/cancel:")


def _log_tail(record) -> str:
    try:
        with open(record.log_path, "rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(handle.tell() - 16384, 0))
            lines = handle.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-LOG_LINES:])


def run_monitor(workdir, run_id: str, what: str, *, ready: Callable | None = None, on_end: Callable | None = None,
                extras: Callable | None = None, every: float = POLL_S) -> None:
    """The live progress of run ``run_id``, polled every ``every`` seconds in a fragment.

    Args:
        what: what the run does, for the caption (``"Training resnet18 on …"``).
        ready: ``ready(record)``: the page can go on before the run ends (a prepare run that
            made what the page needs); ``None``: only when it ends.
        on_end: ``on_end(record)`` when the run ends or is ready, before the whole page reruns.
        extras: ``extras(record, progress)`` draws page-specific parts under the bar from the same
            :class:`cfdebug.runs.RunProgress` (the treatment page's per-epoch curves).
    """
    from ..runs import cancel, progress_of

    registry = _registry(workdir)

    @st.fragment(run_every=every)
    def monitor():
        record = registry.get(run_id)
        if record.finished or (ready is not None and ready(record)):
            if on_end is not None:
                on_end(record)
            st.rerun(scope="app")
        progress = progress_of(registry, run_id)
        st.progress(progress.fraction, text=f"`{run_id}` · {progress.describe()}")
        if extras is not None:
            extras(record, progress)
        left, right = st.columns([1, 4])
        if not read_only() and left.button("Cancel run", key=f"cancel-{run_id}"):
            cancel(registry, run_id)
            st.rerun(scope="app")
        resume = "" if read_only() or record.kind == "prepare" else f" Stopped by a restart? `{resume_command(record, workdir)}` resumes it."
        right.caption(f"{what}: run `{run_id}` in the background, {time.time() - record.created:.0f} s so far. The sidebar and "
                      "the other pages stay usable; closing the tab does not stop it, and whoever opens this page next sees it." + resume)
        if not read_only():
            with st.expander("Run log"):
                st.caption(f"`{record.log_path}` (last {LOG_LINES} lines)")
                st.code(_log_tail(record) or "(nothing logged yet)", language=None)

    monitor()


def watch_runs(ws, kind: str, what: str, *, extras: Callable | None = None) -> list:
    """A :func:`run_monitor` for each queued or running run of ``kind`` on the workspace, and the
    outcome of the newest finished one when it did not end well (:func:`show_run_outcome`).
    Returns the workspace's runs of ``kind``, newest first (:func:`workspace_runs`)."""
    records = workspace_runs(ws, kind)
    for record in records:
        if record.active:
            run_monitor(ws.config.workdir, record.run_id, what, extras=extras)
    finished = [r for r in records if r.finished or r.status == "unreadable"]
    if finished:
        show_run_outcome(finished[0], ws.config.workdir)
    return records


def epoch_rows(progress, label: Callable[[dict], str]) -> list[dict]:
    """A run's epoch rows so far (``progress.epochs``, the engine's rows), each with its ``part``
    from ``label(row)`` (control, treated λ pair, revise method; and the seed): the series
    :func:`epoch_curves` draws."""
    return [{**r, "part": label(r)} for r in progress.epochs if "epoch" in r]


def runs_table(rows: list[dict]) -> None:
    """A page's runs table: one row per run, a dash in a column one run has and another not
    (never "None")."""
    import pandas as pd

    st.dataframe(pd.DataFrame(rows).fillna("—"), hide_index=True, width="stretch")


def no_runs_note(what: str, command: str) -> None:
    """What a page shows before its first run: how to start one, or that a read-only dashboard cannot."""
    st.info(f"No {what} run yet for this model and dataset."
            + (" This read-only dashboard cannot start one." if read_only() else f" Launch one above, or run `{command}`."))


def epoch_curves(record, rows: list[dict], what: str) -> None:
    """A running (or finished) run's per-epoch curves, one series per ``part`` of ``rows``
    (:func:`cfdebug.viz.training_curves`), titled by the run and ``what`` they show: the curves
    every run monitor's extras draw."""
    from .. import viz

    if rows:
        st.plotly_chart(viz.training_curves(rows, f"{record.run_id}: {what}"), width="stretch", key=f"curves-{record.run_id}")


def seeds_label(seeds) -> str:
    """A run's seeds for a runs table: ``"seed 0"``, ``"3 seeds: 0, 1, 2"`` (never a bare
    ``"0"``, which reads as zero seeds); ``"—"`` for none."""
    seeds = [str(v) for v in seeds or []]
    if not seeds:
        return "—"
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"{len(seeds)} seeds: {', '.join(seeds)}"
