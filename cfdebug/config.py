"""Frozen configuration dataclasses, one per stage, and the validators they share.

The CLI and the dashboard widgets both build these; every artifact stores ``asdict(config)``
beside its arrays, and the cache key of an artifact is a hash of the configs it depends on.
Defaults follow ``METHODS.md``; no stage buries a constant in a loop. The stage modules
re-export their config (``from cfdebug.cfe import CFEConfig`` works as before).

A config that is out of range raises :class:`~cfdebug.errors.CfdebugError` on construction,
with a message in the torchmetrics form "Expected `lr` to be a positive number, but got 0.0."
(:func:`check_int`, :func:`check_real`, :func:`check_fraction`, :func:`check_choice`; the
stage modules use the same functions for their other arguments). The workspace configs name
their fields by path (`data.val_fraction`, `device`); :func:`for_cli` turns those names into
the CLI's flags (:data:`CLI_FLAGS`), :func:`rename_fields` into any other labels.

This module must not import torch: the dashboard imports it.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

from .errors import CfdebugError
from .store import jsonable

DEMO_DATASETS = ("biased-digits", "clean-digits", "hard-digits")
DATA_FORMATS = ("auto", "digits", "imagefolder", "cub", "cifar")
# Detection (cfdebug.detect): the Table-1 rows and the agreement metrics a score can use.
DETECT_ROWS = ("avg_recall", "avg_f1", "recall_cut")
DETECT_METRICS = ("recall", "precision", "f1")
# Fine-tuning (cfdebug.treatment, cfdebug.xcr.retrain): which parameters train, and how.
TRAINABLE_CHOICES = ("block+head", "head", "all")
OPTIMIZER_CHOICES = ("sgd", "adam")
# XCR selector (cfdebug.xcr.selector): the map that masks T(x), and what the approximator fits.
SELECTOR_MODES = ("Topk", "Softmax")
SELECTOR_TARGETS = ("labels", "blackbox")
SELECTOR_SCHEDULES = ("constant", "cosine")
SELECTOR_ESTIMATORS = ("straight-through", "relaxed")
# XCR evaluation (cfdebug.data.corruptions): CIFAR-10-C's 15 corruptions by group, 5 severities.
CORRUPTION_GROUPS: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog"),
    "digital": ("brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
CORRUPTIONS: tuple[str, ...] = tuple(name for group in CORRUPTION_GROUPS.values() for name in group)
N_SEVERITIES = 5
# XCR retraining (cfdebug.xcr.retrain): retrain the loaded model, or a seeded fresh one.
INIT_CHOICES = ("pretrained", "scratch")


# --------------------------------------------------------------------------------------------
# Validators (each raises CfdebugError, or returns the value as a plain int/float/str)
# --------------------------------------------------------------------------------------------


def check_int(value: Any, name: str, minimum: int = 1) -> int:
    """Validate an integer ``>= minimum`` and below 2^63 (bools are refused) and return it as ``int``.

    2^63 bounds every integer: seeds above it overflow torch's generators and SQLite's INTEGER.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not minimum <= value < 2**63:
        if minimum == 1:
            expected = "a positive integer"
        elif minimum == 0:
            expected = "a non-negative integer"
        else:
            expected = f"an integer >= {minimum}"
        if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 2**63:
            expected += " below 2^63"
        raise CfdebugError(f"Expected `{name}` to be {expected}, but got {value!r}.")
    return int(value)


def check_real(
    value: Any,
    name: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Validate a finite real number within optional bounds (bools are refused); return it as ``float``.

    ``low``/``high`` are inclusive unless ``low_open``/``high_open``. The message names the
    range: "in [0, 1)" with both bounds, "a positive number" for ``low=0, low_open=True``,
    "a non-negative number" for ``low=0``, "a number >= 2" otherwise.
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if low is not None and high is not None:
            expected = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None and low == 0:
            expected = "a positive number" if low_open else "a non-negative number"
        elif low is not None:
            expected = f"a number {'>' if low_open else '>='} {low:g}"
        elif high is not None:
            expected = f"a number {'<' if high_open else '<='} {high:g}"
        else:
            expected = "a finite number"
        raise CfdebugError(f"Expected `{name}` to be {expected}, but got {value!r}.")
    return float(value)


def check_fraction(value: Any, name: str, upper_open: bool = False) -> float:
    """Validate a threshold in ``[0, 1]`` (``[0, 1)`` with ``upper_open``) and return it."""
    return check_real(value, name, 0.0, 1.0, high_open=upper_open)


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """Validate that ``value`` is one of ``choices`` and return it."""
    if value not in choices:
        raise CfdebugError(f"Expected `{name}` to be one of {', '.join(map(str, choices))}, but got {value!r}.")
    return value


def check_sequence(values: Any, name: str, check) -> tuple:
    """Validate a list (not a string) of distinct items, each through ``check``; return a tuple."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise CfdebugError(f"Expected `{name}` to be a list, but got {values!r}.")
    out = tuple(check(v) for v in values)
    if len(set(out)) != len(out):
        raise CfdebugError(f"Expected `{name}` to hold distinct values, but got {list(values)!r}.")
    return out


def default_workdir() -> str:
    """``$CFDEBUG_HOME`` when set, else ``./.cfdebug``."""
    return os.environ.get("CFDEBUG_HOME") or ".cfdebug"


#: Largest ``DataConfig.input_size`` accepted: a 4096×4096 RGB float32 image is already 192 MiB.
MAX_INPUT_SIZE = 4096
# ``WorkspaceConfig.device``: auto, cpu, cuda or cuda:N (checked here without importing torch).
_DEVICE_PATTERN = re.compile(r"(auto|cpu|cuda(:\d+)?)")


def check_text(value: Any, name: str, optional: bool = False) -> str | None:
    """Validate a non-empty string (or ``None`` with ``optional``) and return it."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        expected = "None or a non-empty string" if optional else "a non-empty string"
        raise CfdebugError(f"Expected `{name}` to be {expected}, but got {value!r}.")
    return value


def _check_rgb(value: Any, name: str, positive: bool) -> None:
    """``None`` or three finite numbers (each > 0 with ``positive``), one per RGB channel."""
    if value is None:
        return
    expected = "three finite numbers > 0 (one per RGB channel)" if positive else "three finite numbers (one per RGB channel)"
    ok = isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) == 3
    ok = ok and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    if not ok or (positive and min(value) <= 0):
        raise CfdebugError(f"Expected `{name}` to be None or {expected}, but got {value!r}.")


def _check_section(value: Any, name: str, cls: type) -> None:
    if not isinstance(value, cls):
        raise CfdebugError(f"Expected `{name}` to be a {cls.__name__}, but got {type(value).__name__}.")


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, and how its images become tensors.

    ``source`` is ``biased-digits``, ``clean-digits`` or a directory. ``input_size``, ``mean``
    and ``std`` of ``None`` take the dataset's defaults (32 px and 0.5/0.25 for the digits and
    CIFAR; 224 px and the ImageNet statistics for ImageFolder and CUB trees). ``bias`` in
    ``[0, 1]`` is the Biased Digits shortcut strength; ``val_fraction`` in ``[0, 1)`` the part
    of train carved out as validation when a dataset has no val split (``load_data`` needs it
    ``> 0`` only then). Messages name the field as ``data.<field>`` (see :data:`CLI_FLAGS`).
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
            _check_section(getattr(self, name), name, cls)
        if not isinstance(self.device, str) or not _DEVICE_PATTERN.fullmatch(self.device):
            raise CfdebugError(f"Expected `device` to be auto, cpu, cuda or cuda:N, but got {self.device!r}.")
        if not isinstance(self.workdir, os.PathLike):
            check_text(self.workdir, "workdir")
        # the dataset's default epochs, fixed here so every key and run.json names them
        object.__setattr__(self, "train", self.train.for_dataset(self.data.source))

    @property
    def workdir_path(self) -> Path:
        return Path(self.workdir)


#: CLI flag of each workspace config field (as library messages name it), for :func:`for_cli`.
#: Fields without a flag (``train.batch_size``, ``extract.num_workers``, …) are left as named.
CLI_FLAGS: dict[str, str] = {
    "model.name": "--model",
    "model.weights": "--weights",
    "model.layer": "--layer",
    "data.source": "--data",
    "data.format": "--format",
    "data.input_size": "--input-size",
    "data.mean": "--mean",
    "data.std": "--std",
    "data.bias": "--bias",
    "data.val_fraction": "--val-fraction",
    "data.seed": "--data-seed",
    "train.epochs": "--epochs",
    "train.lr": "--lr",
    "train.seed": "--seed",
    "extract.batch_size": "--batch-size",
    "device": "--device",
    "workdir": "--workdir",
}


def flag_for(field_name: str) -> str | None:
    """The CLI flag that sets config field ``field_name`` (``"data.input_size"`` → ``"--input-size"``), or None."""
    return CLI_FLAGS.get(field_name)


def rename_fields(message: str, names: dict[str, str]) -> str:
    """``message`` with every backquoted field name in ``names`` replaced by its entry.

    Library messages name config fields (``Expected `data.val_fraction` to be in [0, 1), …``);
    the CLI shows its flags instead (:func:`for_cli`), the dashboard its widget labels.
    """
    return re.sub(r"`([A-Za-z_][\w.]*)`", lambda m: f"`{names.get(m.group(1), m.group(1))}`", message)


def for_cli(message: str) -> str:
    """``message`` with config field names replaced by the CLI flags that set them (:data:`CLI_FLAGS`)."""
    return rename_fields(message, CLI_FLAGS)


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


# --------------------------------------------------------------------------------------------
# Paper A: CFE heads, global MC filters, detection, treatment
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CFEConfig:
    """Training of the MC/MI heads (paper A; constants from METHODS.md).

    ``epochs`` and ``batch_size`` are ours (the papers do not give them): 20 epochs of 128 images
    (180 SGD steps) give a keep rate of 100% on the demo and fit in well under one extraction
    pass (the `bench cfe` target); 80 epochs kept the same rate at 4× the time. The loss is a *sum* over the batch, so a larger batch is also a
    larger step. ``lr``/``momentum`` are the reference SGD
    settings; ``sparsity_lambda·sparsity_scale`` weighs ``Σ|m|`` and ``logits_weight`` weighs
    ``−Σ z'_c`` (the paper's "sparsity loss λ = 2" and "logits loss"). ``mask_threshold`` is θ
    of the thresholded ReLU. ``mi_sparsity`` weighs ``Σ|m|`` of the MI heads.
    ``standardise_inputs`` feeds the Dense layers ``g`` standardised with the training mean/std
    (an affine reparametrisation of the same layer; see :class:`~cfdebug.cfe.MCHeads`): without
    it the demo's masks were nearly constant per class and their agreement did not separate
    errors (AUROC ≈ 0.4–0.6 vs ≈ 0.8). ``seed`` fixes the initial weights and the batch order.
    """

    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    momentum: float = 0.9
    sparsity_lambda: float = 2.0
    sparsity_scale: float = 1e-3
    logits_weight: float = 1e-3
    mask_threshold: float = 0.5
    mi_sparsity: float = 1e-3
    standardise_inputs: bool = True
    seed: int = 0

    def __post_init__(self):
        check_int(self.epochs, "epochs")
        check_int(self.batch_size, "batch_size")
        check_real(self.lr, "lr", low=0.0, low_open=True)
        for name in ("sparsity_lambda", "sparsity_scale", "logits_weight", "mi_sparsity"):
            check_real(getattr(self, name), name, low=0.0)
        check_real(self.momentum, "momentum", 0.0, 1.0, high_open=True)
        check_real(self.mask_threshold, "mask_threshold", 0.0, 1.0, high_open=True)


@dataclass(frozen=True)
class MCFilterConfig:
    """Which training images vote for the global MC filters: ``tau`` is the confidence floor
    (``p ≥ tau``); ``cfe`` trains the MC heads that produce ``MC_x``."""

    tau: float = 0.9
    cfe: CFEConfig = field(default_factory=CFEConfig)

    def __post_init__(self):
        check_fraction(self.tau, "tau")


@dataclass(frozen=True)
class DetectConfig:
    """Misclassification detection (defaults: METHODS.md and the paper's Table 1).

    ``skip_threshold``/``freq_threshold`` apply to the "Avg. Recall" and "Avg. F1" rows;
    ``recall_cut`` with ``recall_cut_skip_threshold``/``recall_cut_freq_threshold`` define the
    "Recall < 0.3" row (0 and 0 in the paper). ``fallback_threshold`` replaces a class's mean
    training metric when it has none. ``flag_row`` picks the row whose flags fill the per-image
    ``flagged`` column and drive re-ranking; ``score_metric`` the continuous agreement score.
    ``ablation_class`` ``None`` averages the ablation over every class with a global set.
    """

    skip_threshold: float = 0.9
    freq_threshold: float = 0.15
    recall_cut: float = 0.3
    recall_cut_skip_threshold: float = 0.0
    recall_cut_freq_threshold: float = 0.0
    fallback_threshold: float = 0.3
    flag_row: str = "avg_f1"
    score_metric: str = "f1"
    rerank_top_k: int = 5
    ablation_class: int | None = None
    ablation_top_n: int = 5
    ablation_draws: int = 20
    seed: int = 0
    split: str = "test"
    filters: MCFilterConfig = field(default_factory=MCFilterConfig)

    def __post_init__(self):
        check_fraction(self.skip_threshold, "skip_threshold")
        check_fraction(self.freq_threshold, "freq_threshold", upper_open=True)
        check_fraction(self.recall_cut, "recall_cut")
        check_fraction(self.recall_cut_skip_threshold, "recall_cut_skip_threshold")
        check_fraction(self.recall_cut_freq_threshold, "recall_cut_freq_threshold", upper_open=True)
        check_fraction(self.fallback_threshold, "fallback_threshold")
        check_choice(self.flag_row, "flag_row", DETECT_ROWS)
        check_choice(self.score_metric, "score_metric", DETECT_METRICS)
        for name in ("rerank_top_k", "ablation_top_n", "ablation_draws"):
            check_int(getattr(self, name), name)
        if self.ablation_class is not None and (
            isinstance(self.ablation_class, bool) or not isinstance(self.ablation_class, numbers.Integral) or self.ablation_class < 0
        ):
            raise CfdebugError(f"Expected `ablation_class` to be None or a class index >= 0, but got {self.ablation_class!r}.")


def check_schedule(config) -> None:
    """Validate the fields every fine-tuning config shares (see :class:`FinetuneConfig`).

    ``config`` is any object with ``epochs``, ``lr``, ``momentum``, ``weight_decay``,
    ``batch_size``, ``seed``, ``dropout``, ``trainable`` and ``optimizer``
    (:func:`cfdebug.treatment.finetune` checks the config it is given with this).
    """
    check_int(config.epochs, "epochs")
    check_real(config.lr, "lr", low=0.0, low_open=True)
    check_real(config.momentum, "momentum", 0.0, 1.0, high_open=True)
    check_real(config.weight_decay, "weight_decay", low=0.0)
    check_int(config.batch_size, "batch_size")
    check_int(config.seed, "seed", 0)
    check_real(config.dropout, "dropout", 0.0, 1.0, high_open=True)
    check_choice(config.trainable, "trainable", TRAINABLE_CHOICES)
    check_choice(config.optimizer, "optimizer", OPTIMIZER_CHOICES)


@dataclass(frozen=True)
class FinetuneConfig:
    """The schedule of a fine-tuning run (:func:`~cfdebug.treatment.finetune`), without any extra loss.

    ``trainable``: ``"block+head"`` (the target block and the head; the rest frozen),
    ``"head"`` or ``"all"``. ``dropout`` is applied to ``g(x)`` [B, C] before the pooled head
    (where the architecture has one). ``optimizer`` ``"sgd"`` uses ``momentum``; ``"adam"``
    ignores it. Validated on construction (:class:`~cfdebug.errors.CfdebugError`).
    """

    epochs: int = 10
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    seed: int = 0
    dropout: float = 0.5
    trainable: str = "block+head"
    optimizer: str = "sgd"

    def __post_init__(self):
        check_schedule(self)


@dataclass(frozen=True)
class TreatmentConfig(FinetuneConfig):
    """Treatment (METHODS.md "Treatment"): the loss weights plus the fine-tuning schedule.

    ``lambda1`` rewards the true class's MC filters, ``lambda2`` penalises the others, both in
    ``[0, 1]`` (paper grid: λ1 1e-4…2e-3, λ2 1e-5…1e-4). ``theta`` is the thresholded-ReLU
    threshold on ``sigmoid(g)``. The control is ``lambda1 = lambda2 = 0``
    (:func:`~cfdebug.treatment.control_config`). The schedule fields are
    :class:`FinetuneConfig`'s.
    """

    lambda1: float = 1e-3
    lambda2: float = 2e-5
    theta: float = 0.5

    def __post_init__(self):
        check_real(self.lambda1, "lambda1", 0.0, 1.0)
        check_real(self.lambda2, "lambda2", 0.0, 1.0)
        check_real(self.theta, "theta", 0.0, 1.0, high_open=True)
        super().__post_init__()


# --------------------------------------------------------------------------------------------
# Paper B: the XCR selector
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelectorConfig:
    """How the XCR selector is trained (defaults from METHODS.md, paper B).

    Attributes:
        k: patches kept per image (12.5 % of the 256 patches of a 32×32 image is 32).
        beta: weight of ``KL(p(z|x) ‖ Uniform(d))`` (the paper's grid: 0.1, 0.01, 0.001).
        patch_size: side ``p`` of a square patch in pixels; must divide the image size.
        tau: Gumbel-softmax temperature of the relaxed training sample.
        mode: which map masks ``T(x)`` after training: ``"Topk"`` (the hard k-hot map) or
            ``"Softmax"`` (the softmax map ``p(x)`` itself; rows sum to 1). Training is the
            same in both modes (the Gumbel training mask), so both share one trained selector.
        target: ``"labels"`` (XCR: fit the true labels) or ``"blackbox"`` (VIBI: fit the black
            box's predicted classes).
        estimator: the training mask: ``"straight-through"`` (the hard top-k of the relaxed
            sample forward, its gradient backward; the default, see METHODS.md) or
            ``"relaxed"`` (the relaxed sample itself, as in paper B).
        epochs, batch_size, lr: Adam training schedule. ``lr`` is the paper's 1e-4; see
            :meth:`demo` for the embedded demo's faster schedule.
        schedule: ``"cosine"`` (the learning rate decays from ``lr`` to 0 along half a cosine
            over all steps) or ``"constant"``.
        width: channel width of the selector and of the approximator's stem (both ResNet-style).
        seed: seeds the initial weights, the batch order and the Gumbel noise.
    """

    k: int = 32
    beta: float = 0.01
    patch_size: int = 2
    tau: float = 0.5
    estimator: str = "straight-through"
    mode: str = "Topk"
    target: str = "labels"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-4
    schedule: str = "cosine"
    width: int = 32
    seed: int = 0

    @classmethod
    def demo(cls, **overrides) -> "SelectorConfig":
        """The schedule for the embedded demo beds: width 16, Adam lr 5e-3 (cosine), 15 epochs.

        Chosen on the VALIDATION split of Hard Digits (k = 32, β = 0.001, the straight-through
        mask; best-epoch top-k validation accuracy of the approximator, 180 images, seeds 0/1):
        width 16 with lr 1e-3: 0.57; 3e-3: 0.76/0.74; 5e-3: 0.83/0.72; 8e-3: 0.64/0.76;
        3e-3 for 10 or 20 epochs: 0.64, 0.76; a constant lr 3e-3: 0.71; width 24 (12 epochs):
        0.58; width 32 at 3e-3: 0.81 but 2.5× the time. With the paper's relaxed mask instead:
        at most 0.64 (width 16) / 0.71 (width 32). The paper's 1e-4 is far too slow for the
        demo's ~1,100 training images (17 steps per epoch). 15 epochs take about 40 s on one
        CPU thread. All other constants stay the paper's.
        """
        return cls(**{"epochs": 15, "lr": 5e-3, "width": 16, **overrides})

    def __post_init__(self):
        check_int(self.k, "k")
        check_int(self.patch_size, "patch_size")
        check_int(self.epochs, "epochs")
        check_int(self.batch_size, "batch_size")
        check_int(self.width, "width")
        check_int(self.seed, "seed", 0)
        check_real(self.beta, "beta", low=0.0)
        check_real(self.tau, "tau", low=0.0, low_open=True)
        check_real(self.lr, "lr", low=0.0, low_open=True)
        check_choice(self.mode, "mode", SELECTOR_MODES)
        check_choice(self.target, "target", SELECTOR_TARGETS)
        check_choice(self.schedule, "schedule", SELECTOR_SCHEDULES)
        check_choice(self.estimator, "estimator", SELECTOR_ESTIMATORS)


# --------------------------------------------------------------------------------------------
# Paper B: XCR retraining and evaluation
# --------------------------------------------------------------------------------------------


def num_patches(height: int, width: int, patch_size: int) -> int:
    """``d = (H/p)·(W/p)``; raises :class:`CfdebugError` when ``p`` does not divide ``H`` and ``W``."""
    check_int(patch_size, "patch_size", 1)
    if height % patch_size or width % patch_size:
        divisors = [p for p in range(1, min(height, width) + 1) if height % p == 0 and width % p == 0]
        shown = ", ".join(map(str, divisors[:12])) + (", …" if len(divisors) > 12 else "")
        raise CfdebugError(
            f"Expected `patch_size` to divide the image size {height}×{width}, but got {patch_size}. "
            f"Choose one of {shown}."
        )
    return (height // patch_size) * (width // patch_size)


def check_k(k, d: int) -> int:
    """Validate ``k`` against the number of patches ``d``; return it as an ``int``."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= d:
        raise CfdebugError(f"Expected `k` to be an integer in 1..{d} (the number of patches), but got {k!r}")
    return int(k)


def _xcr_retrain_default() -> FinetuneConfig:
    # The paper retrains all layers with Adam and no dropout; `seed` is set per run from `seeds`.
    return FinetuneConfig(epochs=10, lr=1e-3, optimizer="adam", momentum=0.9, weight_decay=0.0, batch_size=64,
                          dropout=0.0, trainable="all")


#: :class:`FinetuneConfig` fields of ``XCRConfig.retrain`` that may be given flat (``epochs=3``):
#: :meth:`XCRConfig.demo`, ``override_xcr_config`` and run.json files written before ``retrain``
#: existed. ``seed`` is not one: the runs' seeds are ``XCRConfig.seeds``.
XCR_RETRAIN_FIELDS = ("epochs", "lr", "optimizer", "momentum", "weight_decay", "batch_size", "trainable", "dropout")


def route_retrain_fields(values: dict, retrain: FinetuneConfig) -> dict:
    """``values`` (XCRConfig keywords) with flat :data:`XCR_RETRAIN_FIELDS` moved into ``retrain``.

    Returns a new dict; when it held retraining fields, its ``retrain`` is ``retrain`` (or
    ``values["retrain"]``) with those fields replaced, validated as a :class:`FinetuneConfig`.
    """
    values = dict(values)
    flat = {name: values.pop(name) for name in XCR_RETRAIN_FIELDS if name in values}
    if flat:
        values["retrain"] = replace(values.get("retrain", retrain), **flat)
    return values


@dataclass(frozen=True)
class XCRConfig:
    """One XCR experiment: the selector, the retraining schedule, the evaluation.

    Attributes:
        selector: the :class:`SelectorConfig` whose masks ``T(x)`` are used for retraining
            (its ``k``, ``beta``, ``patch_size``, ``mode``; ``target`` ``"labels"`` is XCR).
        retrain: the :class:`FinetuneConfig` of the retraining, identical for the vanilla and
            the XCR run (default: Adam lr 1e-3, 10 epochs, all layers, no dropout).
            ``batch_size`` counts original images; an XCR batch holds twice as many (the
            originals and their ``T(x)``). Its ``seed`` is replaced by each of ``seeds``.
        init: ``"pretrained"`` (retrain the workspace's black box) or ``"scratch"`` (seeded
            random initialisation of the same architecture, as in the paper).
        seeds: one vanilla and one XCR run per seed; tables report the mean over seeds.
            The selector keeps its own seed (``selector.seed``): one explainer for all runs.
        random_baseline: also retrain with random k-hot masks ("Compare with Random").
        corruptions, severities, corruption_seed: the corrupted test sets (names from
            :data:`cfdebug.data.corruptions.CORRUPTIONS`, severities 1..5). Generated from the
            workspace's test images unless ``cifar10c_dir`` names a CIFAR-10-C folder (then
            its ``<name>.npy`` files are read, with the workspace's test labels).
        max_corrupt_images: evaluate corruptions on a seeded random subset of at most this many
            test images (``None``: all).
        table1_ks, table1_betas: the grid of Table 1 (XCR, VIBI and random masks).
        n_bins: ECE / reliability bins (15, METHODS.md).
    """

    selector: SelectorConfig = field(default_factory=lambda: SelectorConfig(k=32, beta=0.001))
    retrain: FinetuneConfig = field(default_factory=_xcr_retrain_default)
    init: str = "pretrained"
    seeds: tuple[int, ...] = (0, 1, 2)
    random_baseline: bool = False
    corruptions: tuple[str, ...] = CORRUPTIONS
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    corruption_seed: int = 0
    cifar10c_dir: str | None = None
    max_corrupt_images: int | None = None
    table1_ks: tuple[int, ...] = (16, 32, 64)
    table1_betas: tuple[float, ...] = (0.1, 0.01, 0.001)
    n_bins: int = 15

    def __post_init__(self):
        _check_section(self.selector, "selector", SelectorConfig)
        _check_section(self.retrain, "retrain", FinetuneConfig)
        check_int(self.corruption_seed, "corruption_seed", 0)
        check_int(self.n_bins, "n_bins")
        check_choice(self.init, "init", INIT_CHOICES)
        if not isinstance(self.random_baseline, bool):
            raise CfdebugError(f"Expected `random_baseline` to be true or false, but got {self.random_baseline!r}.")
        seeds = check_sequence(self.seeds, "seeds", lambda s: check_int(s, "seeds", 0))
        if not seeds:
            raise CfdebugError("Expected `seeds` to hold at least one seed, but it is empty.")

        def corruption(name):
            if name not in CORRUPTIONS:
                raise CfdebugError(f"Expected `corruptions` to hold names from {', '.join(CORRUPTIONS)}, but got {name!r}.")
            return name

        def severity(s):
            if isinstance(s, bool) or not isinstance(s, numbers.Integral) or not 1 <= s <= N_SEVERITIES:
                raise CfdebugError(f"Expected `severities` to hold integers in 1..{N_SEVERITIES}, but got {s!r}.")
            return int(s)

        corruptions = check_sequence(self.corruptions, "corruptions", corruption)
        severities = check_sequence(self.severities, "severities", severity)
        if bool(corruptions) != bool(severities):
            raise CfdebugError("Expected both `corruptions` and `severities` to be empty (clean evaluation only) or both non-empty.")
        ks = check_sequence(self.table1_ks, "table1_ks", lambda k: check_int(k, "table1_ks"))
        betas = check_sequence(self.table1_betas, "table1_betas", lambda b: check_real(b, "table1_betas", low=0.0))
        if self.max_corrupt_images is not None:
            check_int(self.max_corrupt_images, "max_corrupt_images")
        if self.cifar10c_dir is not None and not isinstance(self.cifar10c_dir, str):
            raise CfdebugError(f"Expected `cifar10c_dir` to be a folder path, but got {self.cifar10c_dir!r}.")
        # Normalise lists (from JSON) to tuples so the frozen config hashes and compares.
        for name, value in (("seeds", seeds), ("corruptions", corruptions), ("severities", severities), ("table1_ks", ks), ("table1_betas", betas)):
            object.__setattr__(self, name, value)

    @property
    def k(self) -> int:
        return self.selector.k

    @property
    def patch_size(self) -> int:
        return self.selector.patch_size

    @classmethod
    def demo(cls, **overrides) -> "XCRConfig":
        """The embedded demo's settings (about 2.5 minutes on 2 CPU cores, measured).

        Selector: :meth:`SelectorConfig.demo` (width 16, Adam 5e-3, 15 epochs) at the paper's best
        ``k = 32, β = 0.001``. Retraining: 3 epochs, Adam 1e-3, all layers, from the trained
        demo CNN, one seed. Evaluation: all 15 corruptions at severities 1, 3 and 5. Table 1:
        k ∈ {16, 32, 64} at β = 0.001. Every field can be overridden, the retraining's also
        flat (:data:`XCR_RETRAIN_FIELDS`), e.g. ``XCRConfig.demo(epochs=1, seeds=(0, 1, 2))``.
        """
        selector = overrides.pop("selector", None) or SelectorConfig.demo(k=32, beta=0.001)
        base = {
            "selector": selector,
            "retrain": replace(_xcr_retrain_default(), epochs=3),
            "seeds": (0,),
            "corruptions": CORRUPTIONS,
            "severities": (1, 3, 5),
            "table1_ks": (16, 32, 64),
            "table1_betas": (0.001,),
        }
        return cls(**route_retrain_fields({**base, **overrides}, base["retrain"]))

    def check_against(self, image_size: int) -> int:
        """Validate ``k``, the patch size and the Table 1 grid against ``image_size``; return ``d``."""
        d = num_patches(image_size, image_size, self.selector.patch_size)
        check_k(self.selector.k, d)
        for k in self.table1_ks:
            check_k(k, d)
        return d


def _known_keys(d: dict, cls: type, what: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise CfdebugError(f"Unknown {what} keys {', '.join(unknown)}; expected some of {', '.join(sorted(known))}.")


def xcr_config_from_dict(d: dict) -> XCRConfig:
    """Rebuild an :class:`XCRConfig` from ``config_dict(config)`` / ``asdict(config)`` (or JSON).

    The retraining schedule is read from ``retrain``, or flat (:data:`XCR_RETRAIN_FIELDS`) as
    run.json files written before ``retrain`` existed hold it; not both. Unknown keys raise
    :class:`CfdebugError` naming them; missing keys take the defaults.
    """
    if isinstance(d, XCRConfig):
        return d
    if not isinstance(d, dict):
        raise CfdebugError(f"Expected the XCR config to be a dict (asdict(XCRConfig)), but got {type(d).__name__}.")
    values = dict(d)
    flat = [name for name in XCR_RETRAIN_FIELDS if name in values]
    if flat and "retrain" in values:
        raise CfdebugError(f"Expected the retraining schedule under `retrain` or flat (an old run.json), but got both (`retrain` and {', '.join(flat)}).")
    _known_keys({k: v for k, v in values.items() if k not in flat}, XCRConfig, "XCR config")
    for name, cls, what in (("selector", SelectorConfig, "selector config"), ("retrain", FinetuneConfig, "retrain config")):
        if isinstance(values.get(name), dict):
            _known_keys(values[name], cls, what)
            values[name] = cls(**values[name])
    for name in ("seeds", "corruptions", "severities", "table1_ks", "table1_betas"):
        if isinstance(values.get(name), list):
            values[name] = tuple(values[name])
    return XCRConfig(**route_retrain_fields(values, _xcr_retrain_default()))


def config_dict(config) -> dict:
    """``asdict`` with tuples as lists, so that it round-trips through JSON unchanged."""
    return jsonable(asdict(config))


# --------------------------------------------------------------------------------------------
# Choices the dashboard offers (the CLI takes any value the configs accept)
# --------------------------------------------------------------------------------------------

#: Treatment λ1 (reward of the true class's MC filters), log-spaced around the paper's 1e-4 … 2e-3.
TREATMENT_LAMBDA1_GRID: tuple[float, ...] = (0.0, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 0.1)
#: Treatment λ2 (penalty on the other filters), log-spaced around the paper's 1e-5 … 1e-4.
TREATMENT_LAMBDA2_GRID: tuple[float, ...] = (0.0, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 1e-3)
#: Fine-tuning learning rates (SGD) offered for a treatment run.
TREATMENT_LR_GRID: tuple[float, ...] = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
#: The XCR selector's β (weight of KL(p || uniform)) values of paper B's Table 1.
XCR_BETA_CHOICES: tuple[float, ...] = (0.1, 0.01, 0.001)
