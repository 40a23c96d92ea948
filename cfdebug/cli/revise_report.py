"""``revise`` (fine-tuning against what is declared not evidence) and ``report`` (every claim
judged against its baseline, written into Markdown files between section markers)."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from ..config import TreatmentConfig
from ..errors import CfdebugError
from ..store import write_text_atomic
from .background import announce_run, print_cancelled, run_spec
from .flags import REVISE_FLAGS, rename_fields
from .options import EPILOG, open_workspace, parse_floats, parse_ints, parse_list, parse_seeds, progress_printer

def _filters(text: str | None, ws) -> list[int]:
    """``--filters I,J,…`` or ``top:N`` (the N filters most specific to a class, as the Class
    filters page ranks them) as filter indices."""
    if not text:
        return []
    if text.startswith("top:"):
        from ..revise import most_specific_filters

        try:
            n = int(text[4:])
        except ValueError:
            raise CfdebugError(f"Expected `--filters top:N` with an integer N, but got {text!r}.") from None
        return most_specific_filters(ws, n)
    return parse_ints(text, "--filters")


def revise_config(args):
    """The :class:`ReviseConfig` of the revise options (shared by ``revise`` and ``report``)."""
    from ..config import ReviseConfig

    values = {"epochs": args.revise_epochs, "lr": args.revise_lr, "fill": args.fill, "rrr_lambda": args.rrr_lambda,
              "filter_lambda": args.filter_lambda, "jitter": args.jitter}
    try:
        return ReviseConfig(**{k: v for k, v in values.items() if v is not None})
    except CfdebugError as exc:
        raise CfdebugError(rename_fields(str(exc), REVISE_FLAGS)) from None


def print_revise(result: dict) -> None:
    """The models a revise run kept (what chose them, what they do) and its verdicts."""
    from ..verdicts import format_verdicts

    decl = result["declaration"]
    print(f"revise: {decl['method']}" + (f", region {decl['region']}" if decl.get("region") else "")
          + (f", filters {decl['filters']}" if decl.get("filters") else "")
          + ((f"; fill chosen on counterfactual validation: {result['fill']}" if result.get("fill_scores") else f"; fill {result['fill']}") if result.get("fill") else ""))
    cols = [c for c in ("model", "seed", "fill", "best_epoch", "cf_val_acc", "plain_val_acc", "test_acc", "cam_over_area", "wrong_region_acc") if c in result["summary"][0]]
    print("  ".join(f"{c:>14}" for c in cols))
    for row in result["summary"]:
        print("  ".join(f"{row[c]:>14.3f}" if isinstance(row.get(c), float) else f"{'-' if row.get(c) is None else str(row.get(c)):>14}" for c in cols))
    print("(epochs chosen on counterfactual validation: the validation split with the declared intervention applied; never test)")
    print(format_verdicts(result["verdicts"]))


def cmd_revise(args) -> dict | None:
    """A revise run (:func:`cfdebug.jobs.run_revise_job`) in the registry, like ``treat``: every
    option is checked (against the data) before the run exists."""
    from ..jobs import revise_spec, run_revise_job
    from ..revise import declare
    from ..runs import RunRegistry

    def new_spec() -> dict:
        if not args.method:
            raise CfdebugError("Expected `--method` (region-counterfactual, region-rrr, filters, filters-zero or appearance), but got none.")
        ws = open_workspace(args)
        decl = declare(ws, args.method, args.region, _filters(args.filters, ws))
        return revise_spec(ws.config, revise_config(args), decl.as_dict(), parse_seeds(args.seeds, "--seeds"), args.budget)

    registry = RunRegistry(args.workdir)
    spec, run_id = run_spec(args, "revise", registry, new_spec)
    started = {}
    result = run_revise_job(spec, registry=registry, run_id=run_id, progress=progress_printer(args, "revise: "),
                            on_start=announce_run(registry, "revise", args.workdir, started))
    if result is None:
        return print_cancelled("revise", started["run_id"]) if started else None
    print_revise(result)
    return result


@contextlib.contextmanager
def _locked(path):
    """An exclusive advisory lock on ``path``.lock for a read-modify-write of ``path``."""
    import fcntl

    with open(f"{path}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            Path(f"{path}.lock").unlink(missing_ok=True)


def _revise_declarations(args, ws) -> list[dict]:
    """The revise methods ``report --claims revise`` judges: ``--method`` (or every method the
    given ``--region``/``--filters`` allow), each checked before any training."""
    from ..config import FILTER_METHODS, REGION_METHODS, REVISE_METHODS
    from ..revise import declare

    filters = _filters(args.filters, ws)
    if args.method in (None, ""):
        methods = (list(REGION_METHODS) if args.region else []) + (list(FILTER_METHODS) if filters else [])
        if not methods:
            raise CfdebugError("Expected `--region X0,Y0,X1,Y1` or `--filters I,J,…` (or `--method appearance`) for the revise claim, but got none.")
    else:
        methods = list(REVISE_METHODS) if args.method == "all" else [m.strip() for m in args.method.split(",") if m.strip()]
    config = revise_config(args)
    out = []
    for method in methods:
        decl = declare(ws, method, args.region, filters)
        out.append({**decl.as_dict(), "config": config})
    return out


def cmd_report(args) -> dict:
    """Every chosen claim on one workspace, each method vs its baseline with a 95% interval and a verdict."""
    from ..claims import CLAIMS, model_line, replace_marked_section, report_markdown, run_claims, verdicts_markdown
    from ..config import TreatmentSchedule
    from ..data.corruptions import CORRUPTIONS
    from ..runtime import fixed_threads
    from ..verdicts import format_verdicts
    from ..xcr import default_xcr_config, override_xcr_config

    claims = parse_list(args.claims, "--claims", str, CLAIMS)
    seeds = parse_seeds(args.seeds, "--seeds")
    lambdas1, lambdas2 = parse_floats(args.lambda1, "--lambda1"), parse_floats(args.lambda2, "--lambda2")
    for name, values in (("--lambda1", lambdas1), ("--lambda2", lambdas2), ("--seeds", seeds)):
        if not values:
            raise CfdebugError(f"Expected at least one value for `{name}`, but got {getattr(args, name[2:])!r}.")
    outputs = [(path, False) for path in args.markdown or []] + [(path, True) for path in args.markdown_verdicts or []]
    for path, _ in outputs:  # before hours of work, not after
        if not Path(path).is_file():
            raise CfdebugError(f"Expected --markdown {path} to be an existing file with the section markers, but it does not exist.")
        replace_marked_section(Path(path).read_text(), args.section or args.data, "")
    with fixed_threads(args.threads, deterministic=False):
        ws = open_workspace(args)
        treatment = TreatmentSchedule(epochs=args.treat_epochs)
        xcr = override_xcr_config(
            default_xcr_config(ws.config), selector_epochs=args.selector_epochs, epochs=args.xcr_epochs,
            corruptions=parse_list(args.corruptions, "--corruptions", str, CORRUPTIONS),
            severities=parse_list(args.severities, "--severities", int, (1, 2, 3, 4, 5)),
        )
        xcr = override_xcr_config(xcr, table1_ks=(xcr.k,), table1_betas=(xcr.selector.beta,))  # Table 1 at the k, β used
        revise = _revise_declarations(args, ws) if "revise" in claims else None
        result = run_claims(ws, claims, seeds, budget=args.budget, treatment=treatment, lambdas1=lambdas1, lambdas2=lambdas2, xcr=xcr,
                            n_boot=args.n_boot, revise=revise, progress=progress_printer(args, "report: "))
    print(f"{ws.config.model.name} on {ws.data.describe()}: {', '.join(claims)} over seeds {', '.join(map(str, seeds))} "
          f"({result['seconds']:.0f} s, {args.threads} thread{'s' if args.threads != 1 else ''})")
    print(format_verdicts(result["verdicts"]))
    title = f"{ws.config.model.name} on {args.data}"
    command = "python -m cfdebug report " + " ".join(a for a in sys.argv[2:] if a) if sys.argv[1:2] == ["report"] else "python -m cfdebug report"
    for path, verdicts_only in outputs:
        short = f"**{title}** (`{command}`). {model_line(result)}\n\n{verdicts_markdown(result['verdicts'], headline_only=True)}"
        body = short if verdicts_only else report_markdown(result, title, command)
        with _locked(path):  # two reports (make -j2 results) may rewrite the same file
            write_text_atomic(path, replace_marked_section(Path(path).read_text(), args.section or args.data, body))
        print(f"wrote the {args.section or args.data} section of {path}", file=sys.stderr)
    return result


def _add_revise_options(p, required_method: bool) -> None:
    from ..config import REVISE_FILLS, REVISE_METHODS, ReviseConfig

    g = p.add_argument_group("revise (what is not evidence, and how cfdebug fine-tunes against it)")
    g.add_argument("--method", required=required_method, default=None,
                   help=f"{' | '.join(REVISE_METHODS)}" + ("" if required_method else "; comma-separated, or `all` (default: the region methods with --region, the filter methods with --filters)"))
    g.add_argument("--region", default=None, metavar="X0,Y0,X1,Y1", help="the rectangle that is not evidence, in the model's input pixels (X1, Y1 exclusive); the demo's corner square is 1,1,7,7")
    g.add_argument("--filters", default=None, metavar="I,J,…", help="target-layer filters that are not evidence, or top:N (the N most class-specific, as the Class filters page ranks them)")
    g.add_argument("--fill", default=None, choices=REVISE_FILLS, help=f"region counterfactual fill (default {ReviseConfig.fill}: chosen on counterfactual validation)")
    g.add_argument("--rrr-lambda", type=float, default=None, help=f"weight of the input-gradient penalty inside the region (default {ReviseConfig.rrr_lambda:g})")
    g.add_argument("--filter-lambda", type=float, default=None, help=f"weight of L_nonMC on the chosen filters (default {ReviseConfig.filter_lambda:g})")
    g.add_argument("--jitter", type=float, default=None, help=f"appearance counterfactual strength in [0, 1] (default {ReviseConfig.jitter:g})")
    g.add_argument("--revise-epochs", type=int, default=None, help=f"fine-tuning epochs of the method and its control (default {ReviseConfig.epochs})")
    g.add_argument("--revise-lr", type=float, default=None, help=f"Adam learning rate of the method and its control (default {ReviseConfig.lr:g}, every layer)")


def add_revise(sub, ws, common) -> None:
    p = sub.add_parser("revise", parents=[ws, common], help="revise: fine-tune against what you declare not evidence (a region, filters, an appearance) vs a CE control; verdicts", epilog=EPILOG)
    _add_revise_options(p, required_method=False)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; the method and the CE control run once per seed (default 0,1,2)")
    p.add_argument("--budget", type=float, default=0.1, help="review budget whose flagged predictions are counted (default 0.1)")
    p.add_argument("--config", default=None, metavar="RUN_JSON", help="start from a run.json (what the dashboard launches)")
    p.add_argument("--run-id", default=None, help="the registry id of the run started with --config")
    p.add_argument("--resume", default=None, metavar="RUN_ID", help="resume a stopped or crashed run from its last checkpoints")
    p.set_defaults(func=cmd_revise)


def add_report(sub, ws, common) -> None:
    p = sub.add_parser("report", parents=[ws, common], help="verdicts: each method vs its baseline (detection vs MSP, treatment vs CE control, XCR vs vanilla) with 95%% intervals over seeds or images", epilog=EPILOG)
    p.add_argument("--claims", default="detection,treatment,xcr", help="comma-separated claims to judge: detection, treatment, xcr, revise (needs --region/--filters/--method), or `all` (default detection,treatment,xcr)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds: CFE fits for detection, paired runs for treatment and XCR (default 0,1,2)")
    p.add_argument("--budget", type=float, default=0.1, help="review budget: the fraction of test predictions flagged, lowest scores first (default 0.1)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples of the test images for detection (default 2000)")
    p.add_argument("--lambda1", default=f"{TreatmentConfig.lambda1:g}", help=f"treatment λ1, or a comma-separated grid: the pair with the best validation accuracy is judged (default {TreatmentConfig.lambda1:g})")
    p.add_argument("--lambda2", default=f"{TreatmentConfig.lambda2:g}", help=f"treatment λ2, or a comma-separated grid (default {TreatmentConfig.lambda2:g})")
    p.add_argument("--treat-epochs", type=int, default=TreatmentConfig.epochs, help=f"fine-tuning epochs of treatment and control (default {TreatmentConfig.epochs})")
    p.add_argument("--selector-epochs", type=int, default=None, help="XCR selector training epochs (default: the XCR default)")
    p.add_argument("--xcr-epochs", type=int, default=None, help="XCR and vanilla retraining epochs (default: the XCR default)")
    p.add_argument("--corruptions", default=None, help="comma-separated corruptions for XCR, or `all` (default: the XCR default)")
    p.add_argument("--severities", default=None, help="comma-separated severities 1-5 for XCR, or `all` (default: the XCR default)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads; a fixed count makes the numbers identical on every machine (default 1)")
    p.add_argument("--markdown", action="append", metavar="FILE", help="replace the section between <!-- SECTION:start/end --> markers in FILE with the full report (repeatable)")
    p.add_argument("--markdown-verdicts", action="append", metavar="FILE", help="the same with the verdict table only (the README's results)")
    p.add_argument("--section", default=None, help="marker name for --markdown (default: the --data value)")
    _add_revise_options(p, required_method=False)
    p.set_defaults(func=cmd_report)
