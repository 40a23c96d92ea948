"""``python -m cfdebug <command>``: every command builds a config and calls the library.

A mistake a user can make prints one line on stderr and exits 2, without a traceback;
progress on long work goes to stderr, results to stdout (and ``--json``/``--csv`` files).

One module per job: :mod:`.main` (the parser and :func:`main`), :mod:`.options` (the workspace
options, value parsing, the checks of path options), :mod:`.flags` (the config field → flag
map), :mod:`.paper_a` (train, extract, detect, treat), :mod:`.paper_b` (xcr),
:mod:`.revise_report` (revise, report), :mod:`.background` (how run commands find their spec;
prepare, runs), :mod:`.tools` (export-demo, models, bench, serve). Importing the package imports
no torch (the dashboard uses the flag map); commands import what they need when they run.
"""

from .flags import CLI_FLAGS, flag_for, for_cli, rename_fields
from .main import build_parser, main

__all__ = ["CLI_FLAGS", "build_parser", "flag_for", "for_cli", "main", "rename_fields"]
