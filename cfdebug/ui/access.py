"""The dashboard side of :mod:`cfdebug.access`: path checks shown as errors, the read-only notice.

Pages that launch or cancel runs call :func:`read_only_notice` and draw their launch form or
cancel button only when it returns False.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from ..access import check_workspace, read_only, resolve_allowed
from ..config import WorkspaceConfig
from ..errors import CfdebugError

__all__ = ["admitted", "check_path", "read_only", "read_only_notice"]

READ_ONLY_NOTICE = (
    "This dashboard is read-only (started with `--read-only`): {what} is off. "
    "Run it yourself with `make demo` to train."
)


def _show(exc: CfdebugError) -> None:
    # as cfdebug.ui.workspace.show_user_error draws it, without stopping the page: the caller
    # falls back to a workspace it may open (that module imports this one, hence no call to it)
    st.error(str(exc), icon=":material/error:")


def check_path(path: str, what: str = "dataset folder") -> Path | None:
    """The real path of ``path`` when it lies inside an allowed root; otherwise the one
    outside-the-roots message as ``st.error`` and None."""
    try:
        return resolve_allowed(path, what=what)
    except CfdebugError as exc:
        _show(exc)
        return None


def admitted(cfg: WorkspaceConfig) -> bool:
    """Whether a visitor may open ``cfg`` (:func:`cfdebug.access.check_workspace`); when not,
    the reason is drawn as ``st.error``."""
    try:
        check_workspace(cfg)
        return True
    except CfdebugError as exc:
        _show(exc)
        return False


def read_only_notice(what: str = "launching and cancelling runs") -> bool:
    """In read-only mode draw one ``st.info`` saying ``what`` is off and return True; else draw
    nothing and return False. ``if not read_only_notice(...): <launch form>``."""
    if not read_only():
        return False
    st.info(READ_ONLY_NOTICE.format(what=what), icon=":material/lock:")
    return True
