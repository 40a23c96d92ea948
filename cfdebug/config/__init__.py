"""Frozen configuration dataclasses, one per stage, and the validators they share.

The CLI and the dashboard widgets both build these; every artifact stores ``asdict(config)``
beside its arrays, and the cache key of an artifact is a hash of the configs it depends on.
Defaults follow ``METHODS.md``; no stage buries a constant in a loop. A config that is out of
range raises :class:`~cfdebug.errors.CfdebugError` on construction, naming the field.

One module per stage: ``checks`` (the validators, :func:`config_dict`), ``workspace`` (model,
data, training, extraction), ``detection`` (CFE heads, global MC filters, detection),
``treatment`` (fine-tuning, treatment), ``revise`` (the user-directed fixes) and ``xcr`` (selector, XCR). ``from cfdebug.config
import X`` works for every name below.

This package must not import torch: the dashboard imports it.
"""

from .checks import check_choice, check_fraction, check_int, check_real, check_section, check_sequence, check_text, config_dict
from .detection import DETECT_METRICS, DETECT_ROWS, CFEConfig, DetectConfig, MCFilterConfig
from .revise import FILTER_METHODS, REGION_METHODS, REVISE_FILLS, REVISE_METHODS, ReviseConfig
from .treatment import OPTIMIZER_CHOICES, TRAINABLE_CHOICES, FinetuneConfig, TreatmentConfig, TreatmentSchedule, check_schedule, check_sweep_schedule
from .workspace import (
    BED_TRAIN_EPOCHS,
    DATA_FORMATS,
    DEFAULT_TRAIN_EPOCHS,
    DEMO_DATASETS,
    DEVICE_CHOICES,
    MAX_INPUT_SIZE,
    DataConfig,
    ExtractConfig,
    ModelConfig,
    TrainConfig,
    WorkspaceConfig,
    default_workdir,
    workspace_config_from_dict,
)
from .xcr import (
    CORRUPTION_GROUPS,
    CORRUPTIONS,
    INIT_CHOICES,
    N_SEVERITIES,
    SELECTOR_ESTIMATORS,
    SELECTOR_MODES,
    SELECTOR_SCHEDULES,
    SELECTOR_TARGETS,
    TABLE1_SWEEP,
    XCR_RETRAIN_FIELDS,
    SelectorConfig,
    XCRConfig,
    route_retrain_fields,
    xcr_config_from_dict,
)

__all__ = [
    # validators and the JSON form
    "check_choice", "check_fraction", "check_int", "check_real", "check_schedule", "check_section", "check_sequence",
    "check_sweep_schedule", "check_text", "config_dict",
    # workspace
    "BED_TRAIN_EPOCHS", "DATA_FORMATS", "DEFAULT_TRAIN_EPOCHS", "DEMO_DATASETS", "DEVICE_CHOICES", "MAX_INPUT_SIZE", "DataConfig", "ExtractConfig",
    "ModelConfig", "TrainConfig", "WorkspaceConfig", "default_workdir", "workspace_config_from_dict",
    # paper A
    "DETECT_METRICS", "DETECT_ROWS", "CFEConfig", "DetectConfig", "MCFilterConfig",
    "OPTIMIZER_CHOICES", "TRAINABLE_CHOICES", "FinetuneConfig", "TreatmentConfig", "TreatmentSchedule",
    # revise
    "FILTER_METHODS", "REGION_METHODS", "REVISE_FILLS", "REVISE_METHODS", "ReviseConfig",
    # paper B
    "CORRUPTION_GROUPS", "CORRUPTIONS", "INIT_CHOICES", "N_SEVERITIES", "SELECTOR_ESTIMATORS", "SELECTOR_MODES",
    "SELECTOR_SCHEDULES", "SELECTOR_TARGETS", "TABLE1_SWEEP", "XCR_RETRAIN_FIELDS", "SelectorConfig", "XCRConfig", "route_retrain_fields",
    "xcr_config_from_dict",
]
