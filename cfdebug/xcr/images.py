"""The test images of the XCR evaluation as uint8, their normalisation, and a model's logits on them.

Corrupted copies are made from uint8 images at the model's input size (CIFAR-10-C parameters
apply to uint8 pixels), so the evaluation holds images as ``[N, S, S, 3]`` uint8 and normalises
them a chunk at a time, exactly as :class:`~cfdebug.data.dataset.TorchSplit` does.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..errors import CfdebugError
from ..store import stable_hash

__all__ = ["test_images", "normalise_images", "predict_images"]

CHUNK = 1024  # images decoded, corrupted and scored at once: memory does not grow with the split


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size and image.shape[1] == size:
        return image
    # Bilinear through PIL, exactly as TorchSplit resizes, so clean and corrupted inputs agree.
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def _load_uint8(split, indices: np.ndarray, size: int) -> np.ndarray:
    """``[n, size, size, 3]`` uint8 images of ``split`` at ``indices``."""
    if split.images is not None and split.images.shape[1:3] == (size, size):
        return np.asarray(split.images[indices])
    out = np.empty((len(indices), size, size, 3), dtype=np.uint8)
    for j, i in enumerate(indices):
        out[j] = _resize(np.asarray(split.load_image(int(i)), dtype=np.uint8), size)
    return out


def test_images(ws, max_images: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The test split as ``(images [N, S, S, 3] uint8, labels [N] int64, indices [N] int64)``.

    ``S`` is the model's input size. With ``max_images`` a seeded random subset (sorted) of at
    most that many images is returned. In-memory datasets (digits, CIFAR batches) are sliced;
    image files are decoded and resized once into a memory-mapped array in the workspace store
    (``xcr-test-images/<key>``), so 75 corrupted copies do not decode the files 75 times and
    the split never has to fit in memory.
    """
    split = ws.data.splits["test"]
    index = np.arange(len(split))
    if max_images is not None and max_images < len(index):
        index = np.sort(np.random.default_rng(seed).choice(index, size=max_images, replace=False))
    labels = np.asarray(split.labels)[index].astype(np.int64)
    size = ws.data.input_size
    if split.images is not None and split.images.shape[1:3] == (size, size):
        return np.asarray(split.images[index]), labels, index
    kind, key = "xcr-test-images", stable_hash("xcr-test-images", ws.key_parts, size, index.tolist())
    if not ws.store.exists(kind, key):
        with ws.store.writer(kind, key, {"key_parts": ws.key_parts, "size": size, "n": len(index)}) as tmp:
            out = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(len(index), size, size, 3))
            for start in range(0, len(index), CHUNK):
                out[start : start + CHUNK] = _load_uint8(split, index[start : start + CHUNK], size)
            out.flush()
            del out
    arrays, _ = ws.store.load_arrays(kind, key, mmap=True)
    return arrays["images"], labels, index


def normalise_images(images: np.ndarray, data) -> torch.Tensor:
    """``[N, H, W, 3]`` uint8 → ``[N, 3, S, S]`` float32, resized to ``data.input_size`` and
    normalised with ``data.mean`` / ``data.std`` (as :class:`~cfdebug.data.dataset.TorchSplit`)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise CfdebugError(f"Expected images [N, H, W, 3] uint8, but got {images.dtype} of shape {list(images.shape)}.")
    size = data.input_size
    if images.shape[1:3] != (size, size):
        images = np.stack([_resize(im, size) for im in images]) if len(images) else np.zeros((0, size, size, 3), np.uint8)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)  # [N, 3, S, S] in [0, 1]
    mean = torch.tensor(data.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(data.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def predict_images(model: torch.nn.Module, images: np.ndarray, data, device, batch_size: int = 256) -> np.ndarray:
    """Logits ``[N, K]`` float32 of ``model`` (eval mode; its mode is restored) on uint8 ``images``."""
    was_training = model.training
    model.eval()
    device = torch.device(device)
    out = []
    try:
        for start in range(0, len(images), batch_size):
            x = normalise_images(images[start : start + batch_size], data).to(device)
            out.append(model(x).float().cpu())
    finally:
        model.train(was_training)
    if not out:
        raise CfdebugError("Expected at least one image to evaluate, but got none.")
    return torch.cat(out).numpy()
