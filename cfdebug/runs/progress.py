"""A run's progress: the one row shape of its progress stream, the one writer jobs report
through (:class:`RunStages`), and the one reader the dashboard shows (:func:`progress_of`).

A progress row (one JSON object per :meth:`RunRegistry.log_progress`, built by :func:`progress_row`):

=================  ==========  ==================================================================
``fraction``       float       the whole run's progress, in [0, 1]
``stage``          str         the stage the run is in (``"load"``, ``"sweep"``, ``"retrain"``, …)
``message``        str         one line for a person: what it does right now
``step``/``steps`` int         (optional) the stage's number, from 1, and how many the run has
``stage_fraction`` float       (optional) the stage's own progress, in [0, 1]
=================  ==========  ==================================================================

The training engine (:func:`cfdebug.training.run_epochs`) logs one more kind of row into the
same stream, once per epoch: its history row (``epoch``, the loss terms, ``train_acc``,
``val_acc``, ``test_acc``, ``val_loss``, ``train_seconds``/``eval_seconds``, ``best_epoch``,
``best_val_acc`` and the caller's tag, e.g. ``lambda1``, ``lambda2``, ``seed``), exactly as the
run's result keeps it. These are the row's *epoch fields*. The engine knows its own epochs but
not where they sit in the run (a treatment sweep or an XCR report runs it several times), so an
epoch row carries no position of its own: the job around it reports the position through
:class:`RunStages` (the engine's progress callback reaches the job's stage at every epoch end),
and :func:`read_progress` gives every epoch row the position of the row logged before it.

Time left is measured, never promised: :func:`seconds_left` extrapolates the current stage's own
rows (the time each was logged against its ``stage_fraction``), and :func:`describe_seconds_left`
is its one wording.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

from ..errors import CfdebugError

if TYPE_CHECKING:  # runtime imports torch; this module stays cheap (the dashboard reads progress with it)
    from ..runtime import Progress
    from .registry import RunRegistry

__all__ = [
    "PROGRESS_EVERY_S", "progress_row", "RunStages", "RunProgress", "read_progress", "progress_of",
    "seconds_left", "describe_seconds_left",
]

#: A stage logs a row at most this often (seconds), besides its first and last.
PROGRESS_EVERY_S = 0.5


def progress_row(fraction: float, stage: str, message: str, *, step: int | None = None, steps: int | None = None,
                 stage_fraction: float | None = None) -> dict:
    """A progress row (the module docstring's table); ``fraction`` and ``stage_fraction`` are clipped to [0, 1]."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise CfdebugError(f"Expected a progress `fraction` to be a number in [0, 1], but got {fraction!r}.")
    if not isinstance(stage, str) or not stage:
        raise CfdebugError(f"Expected a progress `stage` to be a non-empty name, but got {stage!r}.")
    row = {"fraction": min(max(float(fraction), 0.0), 1.0), "stage": stage, "message": str(message)}
    if step is not None:
        row.update(step=int(step), steps=int(steps))
    if stage_fraction is not None:
        row["stage_fraction"] = min(max(float(stage_fraction), 0.0), 1.0)
    return row


class RunStages:
    """The progress of a run made of named stages, each a span of the whole run's bar.

    :meth:`stage` gives a stage's ``progress(fraction, message)`` callback. Each call sends the
    whole run's fraction and the message to ``progress`` (every call) and a :func:`progress_row`
    to ``log`` (at most every :data:`PROGRESS_EVERY_S`, and always the stage's first row, logged
    when the stage starts, and its last).

    Args:
        spans: ``{stage: (lo, hi)}`` in run order, the stage's share of the bar (see :meth:`equal`).
        log: called with each row, e.g. ``lambda row: registry.log_progress(run_id, row)``.
        progress: the caller's own callback (a CLI's printer), or ``None``.
    """

    def __init__(self, spans: Mapping[str, tuple[float, float]], log: Callable[[dict], None] | None = None,
                 progress: Progress | None = None):
        self.spans, self.log, self.progress = dict(spans), log, progress
        self.names = list(self.spans)

    @classmethod
    def equal(cls, names: Sequence[str], log: Callable[[dict], None] | None = None, progress: Progress | None = None) -> RunStages:
        """Stages sharing the bar equally (``names[i]`` spans ``[i/n, (i+1)/n]``)."""
        n = len(names)
        return cls({name: (i / n, (i + 1) / n) for i, name in enumerate(names)}, log, progress)

    def stage(self, name: str, label: str | None = None) -> Progress | None:
        """The callback of stage ``name`` (``None`` when there is nowhere to report); its
        messages read ``"<label>: <message>"`` when ``label`` is given. Logs the first row now."""
        if self.log is None and self.progress is None:
            return None
        lo, hi = self.spans[name]
        step, last = self.names.index(name) + 1, {"time": float("-inf")}

        def report(fraction: float, message: str) -> None:
            fraction = min(max(float(fraction), 0.0), 1.0)
            text = f"{label}: {message}" if label and message else (label or message)
            overall = lo + (hi - lo) * fraction
            if self.progress is not None:
                self.progress(overall, text)
            now = time.monotonic()
            if self.log is None or (0.0 < fraction < 1.0 and now - last["time"] < PROGRESS_EVERY_S):
                return
            last["time"] = now
            self.log(progress_row(overall, name, text, step=step, steps=len(self.names), stage_fraction=fraction))

        report(0.0, "")
        return report


@dataclass(frozen=True)
class RunProgress:
    """Where a run is, read from its progress rows (:func:`read_progress`).

    ``fraction``/``stage``/``message``/``step``/``steps``: the latest row's position;
    ``seconds_left``: measured on the current stage (:func:`seconds_left`), ``None`` until it can
    be; ``epochs``: the engine's epoch rows, oldest first, each with the position it was logged
    at; ``rows``: how many rows the run logged.
    """

    fraction: float = 0.0
    stage: str | None = None
    message: str = ""
    step: int | None = None
    steps: int | None = None
    seconds_left: float | None = None
    epochs: tuple[dict, ...] = ()
    rows: int = 0

    def describe(self) -> str:
        """The monitor's line: ``"Step 2 of 4 · Fitting CFE heads: epoch 3/20 · about 40 s left in this step"``."""
        if not self.rows:
            return "Starting (loading the model and data)…"
        left = describe_seconds_left(self.seconds_left)
        where = " in this step" if self.steps and self.steps > 1 else ""
        parts = [f"Step {self.step} of {self.steps}" if self.step else "", self.message,
                 f"{left}{where}" if left else "estimating the time left…"]
        return " · ".join(p for p in parts if p)


def read_progress(rows: Iterable[tuple[float, dict]], now: float | None = None) -> RunProgress:
    """A :class:`RunProgress` from a run's timed rows (``(logged, row)``, oldest first, as
    :meth:`RunRegistry.timed_progress` returns them)."""
    position: dict = {}
    epochs, points, count = [], [], 0
    for logged, row in rows:
        count += 1
        if "fraction" in row:
            if row.get("stage") != position.get("stage"):
                points = []  # a new stage: its own rows measure its time left
            position = row
            points.append((logged, row.get("stage_fraction", row["fraction"])))
        if "epoch" in row:
            epochs.append({**{k: position[k] for k in ("fraction", "stage", "message") if k in position}, **row})
    if not position and epochs:
        position = {"message": f"epoch {epochs[-1]['epoch']}"}
    return RunProgress(
        fraction=min(max(float(position.get("fraction", 0.0)), 0.0), 1.0), stage=position.get("stage"),
        message=str(position.get("message", "")), step=position.get("step"), steps=position.get("steps"),
        seconds_left=seconds_left(points, now), epochs=tuple(epochs), rows=count,
    )


def progress_of(registry: RunRegistry, run_id: str, now: float | None = None) -> RunProgress:
    """Where run ``run_id`` is: :func:`read_progress` of its rows in ``registry``."""
    return read_progress(registry.timed_progress(run_id), now)


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
