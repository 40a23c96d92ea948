"""The in-memory description of a dataset and its torch view.

A :class:`Split` is either a list of image files or an in-memory uint8 array (the digits and
CIFAR batches); a :class:`DataBundle` holds the splits, the class names and a fingerprint
that changes when any file, size or modification time changes. :class:`TorchSplit` turns a
split into normalised ``[3, S, S]`` float32 tensors for a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import CfdebugError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True, eq=False)
class Split:
    """One split: ``ids`` and int64 ``labels`` [N], plus ``paths`` (files) or ``images`` [N,H,W,3] uint8."""

    name: str
    ids: tuple[str, ...]
    labels: np.ndarray
    paths: tuple[str, ...] | None = None
    images: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: np.ndarray, name: str | None = None) -> "Split":
        index = np.asarray(index)
        return Split(
            name=name or self.name,
            ids=tuple(self.ids[i] for i in index),
            labels=self.labels[index],
            paths=None if self.paths is None else tuple(self.paths[i] for i in index),
            images=None if self.images is None else self.images[index],
        )

    def load_image(self, i: int) -> np.ndarray:
        """Image ``i`` as ``[H, W, 3]`` uint8 at its stored size."""
        if self.images is not None:
            return self.images[i]
        return np.asarray(read_image(self.paths[i]))


@dataclass(frozen=True, eq=False)
class DataBundle:
    """A loaded dataset: splits ``train``, ``val``, ``test``; classes; normalisation; fingerprint."""

    name: str
    format: str
    classes: tuple[str, ...]
    splits: dict[str, Split]
    fingerprint: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    skipped: tuple[str, ...] = field(default=())

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def torch_split(self, split: str) -> "TorchSplit":
        return TorchSplit(self.splits[split], self.input_size, self.mean, self.std)

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {len(v)}" for k, v in self.splits.items())
        return f"{self.name} ({self.format}): {self.num_classes} classes; {sizes} images"


def read_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, or raise :class:`CfdebugError` naming the file."""
    try:
        with Image.open(path) as image:
            return _to_rgb(image)
    except FileNotFoundError as exc:
        raise CfdebugError(f"Image file {path} no longer exists. Re-run on the current dataset.") from exc
    except Image.DecompressionBombError as exc:
        raise CfdebugError(
            f"Refusing image {path}: {exc} Such a file can exhaust memory when decoded (a decompression "
            "bomb). Resize it, or remove it from the dataset."
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise CfdebugError(
            f"Cannot read image {path}: {exc}. The file is not a readable image (truncated or "
            "another format). Remove or replace it, then run again."
        ) from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB at 8 bits per channel. 16-bit grey (``I;16*``, or ``I`` holding values above 255) is
    scaled by 255/65535; Pillow's own conversion clips it, turning almost every pixel white."""
    if image.mode.startswith("I;16") or image.mode == "I":
        array = np.asarray(image)
        if image.mode.startswith("I;16") or array.max(initial=0) > 255:
            array = np.rint(np.clip(array, 0, 65535) * (255.0 / 65535.0))
        return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).convert("RGB")  # 2-D uint8: mode L
    return image.convert("RGB")


class TorchSplit(torch.utils.data.Dataset):
    """Items ``(image [3, S, S] float32 normalised, label int64, index int64)``."""

    def __init__(self, split: Split, size: int, mean, std):
        self.split = split
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        if self.split.images is not None:
            array = self.split.images[i]
            if array.shape[0] != self.size or array.shape[1] != self.size:
                array = np.asarray(Image.fromarray(array).resize((self.size, self.size), Image.BILINEAR))
        else:
            image = read_image(self.split.paths[i])
            if image.size != (self.size, self.size):
                image = image.resize((self.size, self.size), Image.BILINEAR)
            array = np.asarray(image)
        tensor = torch.from_numpy(np.array(array, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)
        return (tensor - self.mean) / self.std, int(self.split.labels[i]), i

    def denormalise(self, batch: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` normalised → ``[B, 3, S, S]`` in [0, 1]."""
        return (batch * self.std.to(batch.device) + self.mean.to(batch.device)).clamp(0, 1)
