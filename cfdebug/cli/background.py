"""Background runs from the terminal: how a run command finds its spec (flags, ``--config``,
``--resume``), what it prints when it starts or is cancelled, and the ``prepare`` and ``runs``
commands."""

from __future__ import annotations

import sys

from ..config import default_workdir
from ..errors import CfdebugError
from .options import EPILOG, progress_printer, workspace_config

def run_spec(args, kind: str, registry, new_spec) -> tuple[dict, str | None]:
    """``(spec, run_id)`` of a run command (treat, xcr, prepare), the same way for each: ``--resume
    RUN_ID`` (a stored run of ``kind``), ``--config RUN_JSON`` (its stored run id unless
    ``--run-id`` names another), or ``new_spec()`` from the flags with no run id (the job then
    registers a new run). ``new_spec`` checks the flags, so a mistake leaves no run behind."""
    from ..jobs import read_run_spec

    if getattr(args, "resume", None):
        record = registry.get(args.resume)
        if record.status == "unreadable":
            raise CfdebugError(f"Cannot resume run {args.resume}: its {record.error}. Start a new run instead.")
        if record.kind != kind:
            raise CfdebugError(f"Run {args.resume} is a {record.kind!r} run, not a {kind!r} run; resume it with `python -m cfdebug {record.kind} --resume {args.resume}`.")
        return record.config, record.run_id
    if args.config:
        spec, stored_id = read_run_spec(args.config)
        return spec, args.run_id or stored_id
    return new_spec(), None


def announce_run(registry, kind: str, workdir: str, started: dict):
    """The ``on_start`` of a run job: keeps ``run_id`` and ``ws`` in ``started`` and prints where
    the run lives and how to resume it, on stderr."""

    def on_start(run_id: str, ws) -> None:
        started.update(run_id=run_id, ws=ws)
        print(f"run {run_id} (registry {registry.db_path}); resume with: python -m cfdebug {kind} --resume {run_id} --workdir {workdir}", file=sys.stderr)

    return on_start


def print_cancelled(kind: str, run_id: str) -> None:
    print(f"run {run_id} was cancelled; resume it with: python -m cfdebug {kind} --resume {run_id}", file=sys.stderr)


def cmd_prepare(args) -> dict | None:
    """A prepare run (:func:`cfdebug.jobs.run_prepare_job`): what the dashboard starts for a page
    whose artifacts are not cached yet; by hand it fills the cache before the dashboard opens."""
    from ..jobs import prepare_spec, run_prepare_job
    from ..runs import RunRegistry

    registry = RunRegistry(args.workdir)
    through = args.through or ("load" if args.train else "detect")
    spec, run_id = run_spec(args, "prepare", registry, lambda: prepare_spec(workspace_config(args), through, train=args.train))
    result = run_prepare_job(spec, registry=registry, run_id=run_id, progress=progress_printer(args))
    if result is None:
        print(f"run {run_id} was cancelled", file=sys.stderr)
        return None
    print(f"{result['model']} on {result['data']}: ready through {result['through']} in {result['seconds']:.1f} s" + (f"; trained weights: {result['weights']}" if result.get("weights") else ""))
    return result


def cmd_runs(args) -> dict:
    from ..runs import BACKGROUND_KINDS, RunRegistry, cancel

    if args.kind is not None and args.kind not in BACKGROUND_KINDS:
        raise CfdebugError(f"Expected `--kind` to be one of {', '.join(BACKGROUND_KINDS)}, but got {args.kind!r}.")
    # Listing reads a read-only workdir too (nothing created or written there); cancelling writes.
    registry = RunRegistry(args.workdir) if args.cancel else RunRegistry.for_reading(args.workdir)
    if args.cancel:
        record = cancel(registry, args.cancel)
        print(f"run {record.run_id}: {record.status}")
        return {"run_id": record.run_id, "status": record.status}
    records = registry.list(args.kind)
    if not records:
        print(f"no runs in {registry.db_path}")
    for r in records:
        progress = r.progress or {}  # the latest row (cfdebug.runs.progress): a position, or an engine epoch
        where = f"{progress['fraction']:.0%} {progress.get('stage', '')}" if "fraction" in progress else f"epoch {progress['epoch']}" if "epoch" in progress else ""
        print(f"{r.run_id}  {r.kind:<7} {r.status:<10} {where:<16} {r.error or ''}")
    return {"runs": [{"run_id": r.run_id, "kind": r.kind, "status": r.status, "error": r.error} for r in records]}


def add_prepare(sub, ws, common) -> None:
    from ..jobs import PREPARE_STAGES

    p = sub.add_parser("prepare", parents=[ws, common], help="open a workspace and cache what the dashboard's pages read (model, features, CFE heads, detection)", epilog=EPILOG)
    p.add_argument("--through", default=None, choices=PREPARE_STAGES, help="last stage to make: load (the model, trained if needed), extract, filters or detect (default detect; load with --train)")
    p.add_argument("--train", action="store_true", help="train the model on the data (a torchvision model without --weights) and stop; prints the weights' path")
    p.add_argument("--config", default=None, metavar="RUN_JSON", help="start from a run.json (what the dashboard launches)")
    p.add_argument("--run-id", default=None, help="the registry id of the run started with --config")
    p.set_defaults(func=cmd_prepare)


def add_runs(sub, ws, common) -> None:
    p = sub.add_parser("runs", parents=[common], help="list the runs (treat, xcr, prepare) with where each is, or cancel one")
    p.add_argument("--workdir", default=default_workdir(), help="artifact cache holding runs.db (default: $CFDEBUG_HOME or ./.cfdebug)")
    p.add_argument("--kind", default=None, help="only runs of this kind (treat, xcr, prepare)")
    p.add_argument("--cancel", default=None, metavar="RUN_ID", help="cancel a queued or running run")
    p.set_defaults(func=cmd_runs)
