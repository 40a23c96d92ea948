"""The embedded Biased Digits set, built from scikit-learn's bundled ``load_digits``.

1,797 real 8×8 handwritten digits, upsampled to 32×32 RGB. Every image carries a small
square in the top-left corner. In the training and validation splits the square has the
digit's class colour on a ``bias`` fraction of images and a random class's colour otherwise;
in the test split its colour is always random. A model trained on it can learn the colour as
a shortcut, and its test accuracy shows what that costs. ``bias=0`` is the clean variant.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import CfdebugError

DIGIT_CLASSES = tuple(str(d) for d in range(10))
IMAGE_SIZE = 32
SQUARE = (slice(1, 7), slice(1, 7))  # rows, cols of the 6×6 corner square
# Ten colours far apart in RGB, so the shortcut is easy to learn (that is the point of the demo).
CLASS_COLOURS = np.array(
    [
        [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
        [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
    ],
    dtype=np.uint8,
)
SPLIT_FRACTIONS = {"train": 0.6, "val": 0.1, "test": 0.3}


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits as ``[1797, 32, 32, 3]`` uint8 grey-on-black and labels ``[1797]`` int64."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = (bunch.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)  # [N, 8, 8]
    big = np.stack(
        [np.asarray(Image.fromarray(im).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)) for im in small]
    )  # [N, 32, 32]
    rgb = np.repeat(big[..., None], 3, axis=-1)
    return rgb, bunch.target.astype(np.int64)


def stratified_split(labels: np.ndarray, seed: int, fractions=SPLIT_FRACTIONS) -> dict[str, np.ndarray]:
    """Seeded stratified split of indices into train/val/test with the given fractions."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in fractions}
    names = list(fractions)
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        bounds = np.round(np.cumsum([fractions[n] for n in names]) * len(idx)).astype(int)
        start = 0
        for name, stop in zip(names, bounds):
            parts[name].append(idx[start:stop])
            start = stop
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}


def paint_squares(images: np.ndarray, colour_class: np.ndarray) -> np.ndarray:
    """Return a copy of ``images`` [N, 32, 32, 3] with each corner square in its class colour."""
    out = images.copy()
    out[:, SQUARE[0], SQUARE[1], :] = CLASS_COLOURS[colour_class][:, None, None, :]
    return out


def build_digits(bias: float = 0.9, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Build the splits: ``{split: (images [N,32,32,3] uint8, labels [N] int64, source_index [N])}``.

    ``bias`` in [0, 1] is the fraction of train/val images whose square has the class colour.
    """
    if not 0.0 <= bias <= 1.0:
        raise CfdebugError(f"Expected `bias` to be a fraction in [0, 1], but got {bias}.")
    images, labels = digit_images()
    rng = np.random.default_rng(seed + 1)
    splits = {}
    for name, idx in stratified_split(labels, seed).items():
        lab = labels[idx]
        colour = rng.integers(0, len(DIGIT_CLASSES), size=len(idx))
        if name != "test":
            biased = rng.random(len(idx)) < bias
            colour = np.where(biased, lab, colour)
        splits[name] = (paint_squares(images[idx], colour), lab, idx)
    return splits


def export_imagefolder(directory: str | Path, bias: float = 0.9, seed: int = 0) -> dict[str, int]:
    """Write the set as ``DIR/{train,val,test}/<class>/<index>.png``; return images per split.

    Refuses a non-empty directory so nothing of the user's is overwritten.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CfdebugError(f"Expected a directory to export into, but {directory} is a file. Choose a new folder name.")
    if directory.exists() and any(directory.iterdir()):
        raise CfdebugError(
            f"Expected an empty or new directory to export into, but {directory} has files in it. "
            "Choose another directory or empty this one."
        )
    splits = build_digits(bias, seed)
    # Written beside the target and renamed into place, so an interrupted export leaves no partial tree.
    final = directory.resolve()  # a real name and parent, also for "."
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    counts = {}
    try:
        for name, (images, labels, source) in splits.items():
            for cls in DIGIT_CLASSES:
                (tmp / name / cls).mkdir(parents=True, exist_ok=True)
            for image, label, index in zip(images, labels, source):
                Image.fromarray(image).save(tmp / name / DIGIT_CLASSES[label] / f"{index:04d}.png")
            counts[name] = len(labels)
        if final.exists():  # an empty folder (maybe someone's cwd): move the splits into it
            for name in counts:
                os.rename(tmp / name, final / name)
            tmp.rmdir()
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts
