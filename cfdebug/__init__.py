"""cfdebug: find why an image classifier fails, and treat it.

The library behind ``python -m cfdebug`` and the Streamlit dashboard. Start with a
:class:`Workspace` (a model on a dataset), then read its cached extractions.
"""

from .config import (
    CFEConfig,
    DataConfig,
    DetectConfig,
    ExtractConfig,
    FinetuneConfig,
    MCFilterConfig,
    ModelConfig,
    SelectorConfig,
    TrainConfig,
    TreatmentConfig,
    WorkspaceConfig,
)
from .errors import CfdebugError

__version__ = "0.1.0"

__all__ = [
    "CFEConfig",
    "CfdebugError",
    "DataConfig",
    "DetectConfig",
    "ExtractConfig",
    "FinetuneConfig",
    "MCFilterConfig",
    "ModelConfig",
    "SelectorConfig",
    "TrainConfig",
    "TreatmentConfig",
    "Workspace",
    "WorkspaceConfig",
    "load_data",
    "__version__",
]


def __getattr__(name):
    # Heavy imports (torch) only when used, so `import cfdebug` in a page stays cheap.
    if name == "Workspace":
        from .workspace import Workspace

        return Workspace
    if name == "load_data":
        from .data import load_data

        return load_data
    raise AttributeError(f"module 'cfdebug' has no attribute {name!r}")
