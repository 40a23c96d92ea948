"""Frozen configuration dataclasses, one per stage.

The CLI and the dashboard widgets both build these; every artifact stores ``asdict(config)``
beside its arrays, and the cache key of an artifact is a hash of the configs it depends on.
Defaults follow ``METHODS.md``; no stage buries a constant in a loop.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEMO_DATASETS = ("biased-digits", "clean-digits")
DATA_FORMATS = ("auto", "digits", "imagefolder", "cub", "cifar")


def default_workdir() -> str:
    """``$CFDEBUG_HOME`` when set, else ``./.cfdebug``."""
    return os.environ.get("CFDEBUG_HOME") or ".cfdebug"


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, and how its images become tensors.

    ``source`` is ``biased-digits``, ``clean-digits`` or a directory. ``input_size``, ``mean``
    and ``std`` of ``None`` take the dataset's defaults (32 px and 0.5/0.25 for the digits and
    CIFAR; 224 px and the ImageNet statistics for ImageFolder and CUB trees).
    """

    source: str = "biased-digits"
    format: str = "auto"
    input_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    bias: float = 0.9
    val_fraction: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """A model: the demo CNN or a torchvision builder by name, optional weights, target layer."""

    name: str = "demo-cnn"
    weights: str | None = None
    layer: str | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Plain cross-entropy training (the demo model, or a user model from scratch).

    The epoch with the best validation accuracy is kept: model selection never sees the test split.
    """

    epochs: int = 8
    lr: float = 1e-3
    weight_decay: float = 5e-4
    batch_size: int = 64
    seed: int = 0


@dataclass(frozen=True)
class ExtractConfig:
    """The streaming pass that stores pooled target-layer features and logits."""

    batch_size: int = 128
    num_workers: int = 0


@dataclass(frozen=True)
class WorkspaceConfig:
    """Everything that identifies a workspace: model, data, device and where artifacts live."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    device: str = "auto"
    workdir: str = field(default_factory=default_workdir)

    @property
    def workdir_path(self) -> Path:
        return Path(self.workdir)


def config_dict(config) -> dict:
    """``asdict`` with tuples as lists, so that it round-trips through JSON unchanged."""
    return _jsonable(asdict(config))


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
