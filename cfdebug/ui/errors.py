"""The dashboard's one error box: every error a page shows goes through :func:`show_error`.

Library messages name config fields and CLI flags (``Expected `data.input_size` …``, ``Pass
`--data` …``); the box names the sidebar's widgets instead (:func:`widget_terms`).
"""

from __future__ import annotations

import re

import streamlit as st

from ..cli import CLI_FLAGS, rename_fields
from ..errors import CfdebugError

__all__ = ["WIDGET_LABELS", "widget_terms", "show_error", "show_user_error"]

#: Sidebar label of each workspace config field, for messages (:func:`widget_terms`).
WIDGET_LABELS: dict[str, str] = {
    "model.name": "Model",
    "model.weights": "Weights (optional)",
    "model.layer": "Target layer",
    "data.source": "Dataset folder",
    "data.format": "Dataset",
    "data.input_size": "Input size",
    "data.mean": "Mean",
    "data.std": "Std",
    "device": "Device",
    "workdir": "CFDEBUG_HOME (the artifact cache)",
}
_FLAG_LABELS = {flag: WIDGET_LABELS[name] for name, flag in CLI_FLAGS.items() if name in WIDGET_LABELS}


def widget_terms(message: str) -> str:
    """``message`` with config field names and CLI flags (`` `--data` ``) named by their sidebar widgets."""
    message = rename_fields(message, WIDGET_LABELS)
    return re.sub(r"`(--[a-z][a-z0-9-]*)`", lambda m: f"`{_FLAG_LABELS.get(m.group(1), m.group(1))}`", message)


def show_error(message: str) -> None:
    """A user-facing error box, in the sidebar's terms rather than the CLI's flags (:func:`widget_terms`)."""
    st.error(widget_terms(message), icon=":material/error:")


def show_user_error(exc: CfdebugError) -> None:
    """Show a user mistake (:func:`show_error`) and stop the page."""
    show_error(str(exc))
    st.stop()
