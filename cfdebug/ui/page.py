"""What every dashboard page starts with: the sidebar, the loaded workspace, its verdicts' home
and the Grad-CAM layer (composed here, above :mod:`.workspace`, :mod:`.verdicts` and :mod:`.filters`,
which each stay free of the others' page logic)."""

from __future__ import annotations

import streamlit as st

from .filters import gradcam_layer_picker
from .verdicts import open_workspace
from .workspace import load_workspace, random_weights_banner, rgb_text, workspace_sidebar

__all__ = ["workspace_page"]


def workspace_page():
    """What every page starts with: the workspace sidebar, then the loaded workspace (with a
    warning and the Train action when its model has random weights).

    The sidebar is drawn by the page (not by ``app.py``) so that a page rerun, in the
    browser or under ``AppTest``, always draws it with the page.
    """
    st.sidebar.title("cfdebug")
    st.sidebar.caption("Why does my classifier fail, and how do I fix it?")
    ws = load_workspace(workspace_sidebar())
    open_workspace(ws)
    d = ws.data
    st.sidebar.caption(f"Images at {d.input_size} px, mean {rgb_text(d.mean)}, std {rgb_text(d.std)}; filters at `{ws.target.name}`.")
    gradcam_layer_picker(ws)
    if ws.random_weights:
        random_weights_banner(ws)
    return ws
