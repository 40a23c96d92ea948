"""The dashboard side of :mod:`cfdebug.access`: the read-only notice (the workspace checks are
drawn by :func:`cfdebug.ui.workspace.refused`).

Pages that launch or cancel runs call :func:`read_only_notice` and draw their launch form or
cancel button only when it returns False.
"""

from __future__ import annotations

import streamlit as st

from ..access import read_only

__all__ = ["read_only", "read_only_notice"]

READ_ONLY_NOTICE = (
    "This dashboard is read-only (started with `--read-only`): {what} is off. "
    "Run it yourself with `make demo` to train."
)


def read_only_notice(what: str = "launching and cancelling runs") -> bool:
    """In read-only mode draw one ``st.info`` saying ``what`` is off and return True; else draw
    nothing and return False. ``if not read_only_notice(...): <launch form>``."""
    if not read_only():
        return False
    st.info(READ_ONLY_NOTICE.format(what=what), icon=":material/lock:")
    return True
