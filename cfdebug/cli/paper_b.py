"""Paper B's command: ``xcr`` (the selector, counterfactual retraining, Tables 1-2)."""

from __future__ import annotations

from ..errors import CfdebugError
from .background import announce_run, print_cancelled, run_spec
from .flags import XCR_FLAGS, rename_fields
from .options import EPILOG, parse_list, progress_printer, workspace_config

def xcr_run_config(args) -> dict:
    """The spec an XCR run is started from (what the dashboard writes to run.json), from the flags."""
    from ..data.corruptions import CORRUPTIONS
    from ..config import TABLE1_SWEEP
    from ..jobs import xcr_spec
    from ..xcr import default_xcr_config, override_xcr_config

    ws_config = workspace_config(args)
    cfg = override_xcr_config(
        default_xcr_config(ws_config),
        k=args.k, beta=args.beta, patch_size=args.patch_size, mode=args.mode, selector_epochs=args.selector_epochs,
        epochs=args.xcr_epochs, lr=args.xcr_lr, seeds=parse_list(args.seeds, "--seeds", int, ()),
        corruptions=parse_list(args.corruptions, "--corruptions", str, CORRUPTIONS),
        severities=parse_list(args.severities, "--severities", int, (1, 2, 3, 4, 5)),
        cifar10c_dir=args.cifar10c, random_baseline=args.random_baseline or None, init=args.init,
        max_corrupt_images=args.max_corrupt_images, **(TABLE1_SWEEP if args.table1_sweep else {}),
    )
    return xcr_spec(ws_config, cfg)


def cmd_xcr(args) -> dict | None:
    """An XCR report as a registry run (:func:`cfdebug.jobs.run_xcr_job`), like ``treat``: the job
    checks the options against the data, then registers the run (unless ``--config``/``--resume``
    name one), so the Calibration page lists what a terminal ran."""
    from ..jobs import run_xcr_job
    from ..runs import RunRegistry
    from ..xcr import print_table1, print_table2

    registry = RunRegistry(args.workdir)
    try:
        spec, run_id = run_spec(args, "xcr", registry, lambda: xcr_run_config(args))
        started = {"run_id": run_id}
        result = run_xcr_job(spec, registry=registry, run_id=run_id, progress=progress_printer(args, "xcr: "),
                             on_start=announce_run(registry, "xcr", args.workdir, started), use_cache=not args.no_cache)
    except CfdebugError as exc:
        raise CfdebugError(rename_fields(str(exc), XCR_FLAGS)) from None
    if result is None:
        return print_cancelled("xcr", started["run_id"]) if started["run_id"] else None
    print_table1(result)
    print_table2(result)
    return result


def add_xcr(sub, ws, common) -> None:
    p = sub.add_parser("xcr", parents=[ws, common], help="XCR: explanation selector, masks, counterfactual retraining vs vanilla; calibration on clean and corrupted images (paper B Tables 1-2)", epilog=EPILOG)
    p.add_argument("--config", default=None, metavar="RUN_JSON", help="start from a run.json (what the dashboard launches)")
    p.add_argument("--run-id", default=None, help="the registry id of the run started with --config")
    p.add_argument("--resume", default=None, metavar="RUN_ID", help="resume a stopped or crashed run from its last checkpoint")
    p.add_argument("--k", type=int, default=None, help="patches kept by the selector (default 32 of 256 at 32 px, patch 2)")
    p.add_argument("--beta", type=float, default=None, help="weight of KL(p || uniform) in the selector loss")
    p.add_argument("--patch-size", type=int, default=None, help="patch side in pixels; must divide the image (default 2)")
    p.add_argument("--mode", default=None, choices=["Topk", "Softmax"], help="selection map used for T(x)")
    p.add_argument("--selector-epochs", type=int, default=None, help="selector training epochs")
    p.add_argument("--xcr-epochs", type=int, default=None, help="retraining epochs (vanilla and XCR alike)")
    p.add_argument("--xcr-lr", type=float, default=None, help="retraining learning rate")
    p.add_argument("--seeds", default=None, help="comma-separated retraining seeds (means over seeds are reported)")
    p.add_argument("--corruptions", default=None, help="comma-separated corruption names, or `all` (the 15 of CIFAR-10-C)")
    p.add_argument("--severities", default=None, help="comma-separated severities 1-5, or `all`")
    p.add_argument("--cifar10c", default=None, metavar="DIR", help="use the official CIFAR-10-C .npy files in DIR instead of generating corruptions")
    p.add_argument("--random-baseline", action="store_true", help="also retrain with random k-hot masks (paper B's random comparison)")
    p.add_argument("--init", default=None, choices=["pretrained", "scratch"], help="retrain from the loaded model or from a seeded random start")
    p.add_argument("--max-corrupt-images", type=int, default=None, help="cap on corrupted test images per corruption and severity")
    p.add_argument("--table1-sweep", action="store_true", help="Table 1 over paper B's grid, k in 16,32,64 x beta in 0.1,0.01,0.001 "
                   "(9 more XCR and VIBI selectors to train: several times the default run's time); default: Table 1 at the --k, --beta used")
    p.add_argument("--no-cache", action="store_true", help="recompute even when the same report is cached")
    p.set_defaults(func=cmd_xcr)
