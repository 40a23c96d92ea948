"""cfdebug: find why an image classifier fails, and treat it.

The library behind ``python -m cfdebug`` and the Streamlit dashboard. Start with a
:class:`Workspace` (a model on a dataset, from a :class:`WorkspaceConfig`), then run a stage
on it: :func:`run_detection` (paper A's flagged predictions and detection scores),
:func:`treatment_sweep` / :func:`run_treat_job` (treatment), :func:`run_xcr_report` /
:func:`run_xcr_job` (paper B's XCR), :func:`run_claims` (each claim against its baseline, with
an interval and a verdict); :func:`run_prepare_job` fills the cache the dashboard reads. The
names in ``__all__`` are the API; the modules' other functions stay importable but may change.

``import cfdebug`` is cheap (no torch): the names that need torch load on first use.
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
    TreatmentSchedule,
    WorkspaceConfig,
    XCRConfig,
)
from .errors import CfdebugError

__version__ = "0.1.0"

# Public name -> the module that defines it; imported on first use (these import torch).
_LAZY = {
    "Workspace": "workspace",
    "load_data": "data",
    "run_detection": "detect",
    "treatment_sweep": "treatment",
    "run_xcr_report": "xcr",
    "run_treat_job": "jobs",
    "run_xcr_job": "jobs",
    "run_prepare_job": "jobs",
    "run_claims": "claims",
    "treat_spec": "jobs",
    "xcr_spec": "jobs",
    "RunRegistry": "runs",
    "start_background_run": "runs",
}

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
    "TreatmentSchedule",
    "WorkspaceConfig",
    "XCRConfig",
    *_LAZY,
    "__version__",
]


def __getattr__(name):
    # Heavy imports (torch) only when used, so `import cfdebug` in a page stays cheap.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'cfdebug' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
