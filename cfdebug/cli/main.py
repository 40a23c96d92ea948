"""The parser (every subcommand, in the order ``--help`` lists them) and :func:`main`."""

from __future__ import annotations

import argparse
import sys
import warnings

from ..errors import CfdebugError
from .background import add_prepare, add_runs
from .flags import for_cli
from .options import EPILOG, check_path_options, workspace_options
from .paper_a import add_detect, add_extract, add_train, add_treat
from .paper_b import add_xcr
from .revise_report import add_report, add_revise
from .tools import add_bench, add_export_demo, add_models, add_serve

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cfdebug",
        description="Find why an image classifier fails (counterfactual filters, XCR) and treat it.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ws = workspace_options()
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON to OUT")
    commands = (add_train, add_extract, add_detect, add_treat, add_xcr, add_revise, add_prepare, add_report, add_runs,
                add_export_demo, add_models, add_bench, add_serve)  # in the order --help lists them
    for add in commands:
        add(sub, ws, common)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings meant for the user print as one line, without the source location."""
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_path_options(args)
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _show_warning
            result = args.func(args)
        if getattr(args, "json", None) and result is not None:
            from ..store import write_json_atomic

            write_json_atomic(args.json, result)
            print(f"results written to {args.json}", file=sys.stderr)
    except CfdebugError as exc:
        print(f"error: {for_cli(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was kept", file=sys.stderr)
        return 130
    return 0
