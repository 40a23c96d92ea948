"""The only part of the package that imports streamlit: cached wrappers, session state, widgets.

Pages call these and place what they return; they never import torch. ``errors`` is the one
error box, ``cache`` the one cache of computed objects, ``runs`` the one run monitor and the
runs of a workspace, ``workspace`` the sidebar and the loaded workspace.
"""

from . import runs, treatment, workspace
from .errors import show_error, show_user_error, widget_terms
from .filters import causal_check, detection, global_filters, gradcam_overlays, local_masks
from .workspace import (
    await_prepare,
    class_names,
    current_config,
    extraction,
    load_workspace,
    progress_callback,
    sample_images,
    use_weights,
    workspace_sidebar,
)
from .page import workspace_page

__all__ = [
    "causal_check",
    "detection",
    "global_filters",
    "gradcam_overlays",
    "local_masks",
    "await_prepare",
    "class_names",
    "current_config",
    "extraction",
    "load_workspace",
    "progress_callback",
    "sample_images",
    "show_error",
    "show_user_error",
    "use_weights",
    "widget_terms",
    "workspace_page",
    "workspace_sidebar",
]
