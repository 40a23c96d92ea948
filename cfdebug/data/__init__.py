"""Datasets: the embedded Biased and Hard Digits, ImageFolder trees, CUB-200-2011 and CIFAR batches.

``load_data(DataConfig)`` returns a :class:`DataBundle` with ``train``, ``val`` and ``test``
splits. When a layout has no validation split, a seeded stratified ``val_fraction`` of the
training split becomes one, so model selection never needs the test split.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import numpy as np

from ..config import DATA_FORMATS, DEMO_DATASETS, DataConfig
from ..errors import CfdebugError
from ..store import stable_hash
from .dataset import DataBundle, Split, TorchSplit, read_image
from .digits import DIGIT_CLASSES, HARD_JITTER, build_bed, export_imagefolder
from .formats import detect_format, display_path, read_cifar, read_cub, read_imagefolder, tree_fingerprint

__all__ = ["DataBundle", "Split", "TorchSplit", "load_data", "read_image", "export_imagefolder", "carve_validation"]

SMALL_DEFAULTS = (32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
IMAGENET_DEFAULTS = (224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
READERS = {"imagefolder": read_imagefolder, "cub": read_cub, "cifar": read_cifar}


def val_fraction_error(value) -> CfdebugError:
    """The one message for a validation fraction out of range, whichever check meets it first (the
    CLI's, before any work, or :func:`carve_validation`'s, when the dataset has no val/ split)."""
    return CfdebugError(
        f"Expected `data.val_fraction` to be in [0, 1), and above 0 for a dataset without a val/ split "
        f"(that fraction of train becomes the validation split), but got {value!r}."
    )


def carve_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Seeded stratified split of ``train`` into (train, val); every class keeps ≥ 1 training image."""
    if not 0.0 < fraction < 1.0:
        raise val_fraction_error(fraction)
    rng = np.random.default_rng(seed)
    val_idx = []
    for cls in np.unique(train.labels):
        idx = rng.permutation(np.flatnonzero(train.labels == cls))
        # at least one per class that can spare one, so a small dataset never gets an empty val split
        take = min(max(int(round(fraction * len(idx))), 1), len(idx) - 1)
        val_idx.append(idx[:take])
    val_idx = np.sort(np.concatenate(val_idx))
    keep = np.setdiff1d(np.arange(len(train)), val_idx)
    return train.subset(keep, "train"), train.subset(val_idx, "val")


@functools.lru_cache(maxsize=4)
def _digits_bundle(bed: str, bias: float, seed: int) -> tuple[dict[str, Split], str]:
    splits = {}
    for name, (images, labels, source) in build_bed(bed, bias, seed).items():
        images.setflags(write=False)
        ids = tuple(f"{name}/{DIGIT_CLASSES[l]}/{i:04d}" for l, i in zip(labels, source))
        splits[name] = Split(name, ids, labels, images=images)
    if bed == "hard-digits":  # the jitter ranges are part of the data: a retuned bed is another dataset
        return splits, stable_hash("hard-digits", seed, len(splits["train"]), dataclasses.asdict(HARD_JITTER), "v1")
    return splits, stable_hash("digits", bias, seed, len(splits["train"]), "v1")


def load_data(config: DataConfig) -> DataBundle:
    """Load the dataset ``config.source`` names; see :class:`cfdebug.config.DataConfig`."""
    if config.format not in DATA_FORMATS:
        raise CfdebugError(f"Expected `--format` to be one of {', '.join(DATA_FORMATS)}, but got {config.format!r}.")
    if config.source in DEMO_DATASETS or config.format == "digits":
        bed = config.source if config.source in DEMO_DATASETS else "biased-digits"
        bias = 0.0 if bed != "biased-digits" else config.bias
        splits, fingerprint = _digits_bundle(bed, float(bias), int(config.seed))
        name, fmt, classes, skipped = config.source, "digits", DIGIT_CLASSES, ()
        defaults = SMALL_DEFAULTS
    else:
        root = Path(config.source).expanduser()
        if not root.exists():
            raise CfdebugError(
                f"Dataset path {root} does not exist. Pass `--data` an existing folder, or one of "
                f"{', '.join(DEMO_DATASETS)} for the embedded demo."
            )
        if not root.is_dir():
            raise CfdebugError(f"Expected `--data` to be a folder, but {root} is a file.")
        fmt = detect_format(root) if config.format == "auto" else config.format
        classes, splits, files, skipped = READERS[fmt](root)
        if "val" not in splits:
            splits["train"], splits["val"] = carve_validation(splits["train"], config.val_fraction, config.seed)
        fingerprint = stable_hash(fmt, tree_fingerprint(root, files), config.val_fraction, config.seed)
        name, skipped = display_path(root.name), tuple(skipped)  # printable, also when the folder name is not UTF-8
        defaults = SMALL_DEFAULTS if fmt == "cifar" else IMAGENET_DEFAULTS
    if len(classes) < 2:
        raise CfdebugError(
            f"Expected at least 2 classes in {name}, but found one class ({', '.join(map(str, classes)) or 'none'}): "
            "a classifier, its errors and counterfactual filters need two or more. Add a class folder."
        )
    size = defaults[0] if config.input_size is None else config.input_size
    if size < 8:
        raise CfdebugError(f"Expected `--input-size` to be at least 8 pixels, but got {size}.")
    mean = tuple(config.mean or defaults[1])
    std = tuple(config.std or defaults[2])
    if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(float(v)) for v in mean + std) or min(std) <= 0:
        raise CfdebugError(f"Expected `--mean` and `--std` as three finite numbers each (std > 0), but got {mean} and {std}.")
    return DataBundle(
        name=name,
        format=fmt,
        classes=tuple(classes),
        splits={k: splits[k] for k in ("train", "val", "test")},
        fingerprint=fingerprint,
        input_size=int(size),
        mean=mean,
        std=std,
        skipped=skipped,
    )
