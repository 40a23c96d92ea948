"""The workspace's configs: which model, which data, how a model is trained and features extracted.

The workspace configs name their fields by path (`data.val_fraction`, `device`) in their
messages; the CLI turns those names into its flags (:func:`cfdebug.cli.for_cli`), the dashboard
into its widget labels.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from ..errors import CfdebugError
from .checks import check_choice, check_fraction, check_int, check_real, check_section, check_text

DEMO_DATASETS = ("biased-digits", "clean-digits", "hard-digits")
DATA_FORMATS = ("auto", "digits", "imagefolder", "cub", "cifar")


def default_workdir() -> str:
    """``$CFDEBUG_HOME`` when set, else ``./.cfdebug``."""
    return os.environ.get("CFDEBUG_HOME") or ".cfdebug"


#: Largest ``DataConfig.input_size`` accepted: a 4096×4096 RGB float32 image is already 192 MiB.
MAX_INPUT_SIZE = 4096
#: The device kinds ``--device`` and the dashboard offer (``cuda:N`` picks one GPU); the one list
#: (:func:`cfdebug.runtime.resolve_device` turns a name into a ``torch.device``).
DEVICE_CHOICES = ("auto", "cpu", "cuda")
# ``WorkspaceConfig.device``: auto, cpu, cuda or cuda:N (checked here without importing torch).
_DEVICE_PATTERN = re.compile(r"(auto|cpu|cuda(:\d+)?)")


def _check_rgb(value: Any, name: str, positive: bool) -> None:
    """``None`` or three finite numbers (each > 0 with ``positive``), one per RGB channel."""
    if value is None:
        return
    expected = "three finite numbers > 0 (one per RGB channel)" if positive else "three finite numbers (one per RGB channel)"
    ok = isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) == 3
    ok = ok and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not ok or (positive and min(value) <= 0):
        raise CfdebugError(f"Expected `{name}` to be None or {expected}, but got {value!r}.")


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, and how its images become tensors.

    ``source`` is ``biased-digits``, ``clean-digits`` or a directory. ``input_size``, ``mean``
    and ``std`` of ``None`` take the dataset's defaults (32 px and 0.5/0.25 for the digits and
    CIFAR; 224 px and the ImageNet statistics for ImageFolder and CUB trees). ``bias`` in
    ``[0, 1]`` is the Biased Digits shortcut strength; ``val_fraction`` in ``[0, 1)`` the part
    of train carved out as validation when a dataset has no val split (``load_data`` needs it
    ``> 0`` only then). Messages name the field as ``data.<field>`` (the CLI shows its flags,
    :data:`cfdebug.cli.CLI_FLAGS`).
    """

    source: str = "biased-digits"
    format: str = "auto"
    input_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    bias: float = 0.9
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self):
        check_text(self.source, "data.source")
        check_choice(self.format, "data.format", DATA_FORMATS)
        if self.input_size is not None and (
            isinstance(self.input_size, bool) or not isinstance(self.input_size, numbers.Integral)
            or not 1 <= self.input_size <= MAX_INPUT_SIZE
        ):
            raise CfdebugError(f"Expected `data.input_size` to be None or an integer in 1..{MAX_INPUT_SIZE} (pixels), but got {self.input_size!r}.")
        _check_rgb(self.mean, "data.mean", positive=False)
        _check_rgb(self.std, "data.std", positive=True)
        check_fraction(self.bias, "data.bias")
        check_fraction(self.val_fraction, "data.val_fraction", upper_open=True)
        check_int(self.seed, "data.seed", 0)
        # Lists (JSON) become tuples so the frozen config hashes; the values are kept as given.
        for name in ("mean", "std"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))


@dataclass(frozen=True)
class ModelConfig:
    """A model: the demo CNN or a torchvision builder by name, optional weights, target layer."""

    name: str = "demo-cnn"
    weights: str | None = None
    layer: str | None = None

    def __post_init__(self):
        check_text(self.name, "model.name")
        if not isinstance(self.weights, os.PathLike):
            check_text(self.weights, "model.weights", optional=True)
        check_text(self.layer, "model.layer", optional=True)


DEFAULT_TRAIN_EPOCHS = 8
# Hard Digits needs more epochs before its training images are classified confidently (p >= 0.9,
# the floor for voting on global MC filters): at 8 epochs six classes had no such image and could
# not be scored at all; at 20 the demo CNN fits the training split and still errs on 8.5% of test.
BED_TRAIN_EPOCHS = {"hard-digits": 20}


@dataclass(frozen=True)
class TrainConfig:
    """Plain cross-entropy training (the demo model, or a user model from scratch).

    The epoch with the best validation accuracy is kept: model selection never sees the test split.
    ``epochs`` of ``None`` takes the dataset's default (:data:`DEFAULT_TRAIN_EPOCHS`, or
    :data:`BED_TRAIN_EPOCHS` for an embedded bed); a :class:`WorkspaceConfig` resolves it.
    """

    epochs: int | None = None
    lr: float = 1e-3
    weight_decay: float = 5e-4
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.epochs is not None:
            check_int(self.epochs, "train.epochs")
        check_real(self.lr, "train.lr", low=0.0, low_open=True)
        check_real(self.weight_decay, "train.weight_decay", low=0.0)
        check_int(self.batch_size, "train.batch_size")
        check_int(self.seed, "train.seed", 0)

    def for_dataset(self, source: str) -> "TrainConfig":
        """This config with ``epochs`` resolved for dataset ``source`` when it is ``None``."""
        if self.epochs is not None:
            return self
        return replace(self, epochs=BED_TRAIN_EPOCHS.get(source, DEFAULT_TRAIN_EPOCHS))


@dataclass(frozen=True)
class ExtractConfig:
    """The streaming pass that stores pooled target-layer features and logits."""

    batch_size: int = 128
    num_workers: int = 0

    def __post_init__(self):
        check_int(self.batch_size, "extract.batch_size")
        check_int(self.num_workers, "extract.num_workers", 0)


@dataclass(frozen=True)
class WorkspaceConfig:
    """Everything that identifies a workspace: model, data, device and where artifacts live.

    ``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether that device exists is
    checked when the workspace opens it); ``workdir`` a non-empty folder path.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    device: str = "auto"
    workdir: str = field(default_factory=default_workdir)

    def __post_init__(self):
        for name, cls in (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig), ("extract", ExtractConfig)):
            check_section(getattr(self, name), name, cls)
        if not isinstance(self.device, str) or not _DEVICE_PATTERN.fullmatch(self.device):
            raise CfdebugError(f"Expected `device` to be auto, cpu, cuda or cuda:N, but got {self.device!r}.")
        if not isinstance(self.workdir, os.PathLike):
            check_text(self.workdir, "workdir")
        # the dataset's default epochs, fixed here so every key and run.json names them
        object.__setattr__(self, "train", self.train.for_dataset(self.data.source))

    @property
    def workdir_path(self) -> Path:
        return Path(self.workdir)


def workspace_config_from_dict(d: dict) -> WorkspaceConfig:
    """The :class:`WorkspaceConfig` that ``config_dict`` wrote (run.json, artifacts' meta).

    Lists become tuples again; missing sections take their defaults. A dict of another shape is
    a :class:`CfdebugError` naming what is wrong.
    """
    if not isinstance(d, dict):
        raise CfdebugError(f"Expected a workspace config as a JSON object, but got {type(d).__name__}.")
    try:
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(d.get("data", {})).items()}
        return WorkspaceConfig(
            model=ModelConfig(**d.get("model", {})),
            data=DataConfig(**data),
            train=TrainConfig(**d.get("train", {})),
            extract=ExtractConfig(**d.get("extract", {})),
            device=d.get("device", "auto"),
            workdir=d.get("workdir") or default_workdir(),
        )
    except TypeError as exc:
        raise CfdebugError(f"Expected a workspace config as written by config_dict(WorkspaceConfig), but {exc}.") from None
