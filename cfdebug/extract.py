"""One streaming pass over a dataset split: pooled target-layer features, logits, labels.

The target layer's output is average-pooled on the device inside the hook, so a full feature
map never leaves the forward pass, and each batch is written straight into memory-mapped
``.npy`` files in the artifact's temporary folder: memory does not grow with the dataset.
The artifact is keyed by the model weights, target layer, dataset fingerprint and transform.

Architectures whose classifier head does not start with global average pooling (torchvision
VGG) also need the target feature maps themselves for the CFE heads:
:meth:`ExtractionCache.maps` streams them into one memory-mapped ``maps.npy`` ``[N, C, h, w]``
(kind ``"fmaps"``), only on request, after checking that the disk can hold them.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap

from .errors import CfdebugError
from .hooks import capture
from .metrics import softmax
from .runtime import Progress
from .store import format_bytes, no_space_error, stable_hash



@dataclass
class Extraction:
    """Cached outputs for one split: ``features`` [N, C] float32 (GAP of the target layer),
    ``logits`` [N, K] float32, ``labels`` [N] int64, ``ids`` [N] str."""

    split: str
    features: np.ndarray
    logits: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    meta: dict = field(default_factory=dict)
    cache_hit: bool = False
    path: Path | None = None

    @cached_property
    def probs(self) -> np.ndarray:
        return softmax(self.logits)

    @property
    def preds(self) -> np.ndarray:
        return self.logits.argmax(1)

    @property
    def accuracy(self) -> float:
        return float((self.preds == self.labels).mean())

    def per_class_recall(self, n_classes: int) -> np.ndarray:
        """Recall per class ``[K]`` (NaN for a class with no images in this split)."""
        recall = np.full(n_classes, np.nan)
        for c in range(n_classes):
            mask = self.labels == c
            if mask.any():
                recall[c] = float((self.preds[mask] == c).mean())
        return recall


def stream_features(
    model: torch.nn.Module,
    layer: str,
    batches,
    n_items: int,
    out_dir: Path,
    device: torch.device,
    activation=None,
    progress: Progress | None = None,
    keep_maps: bool = False,
) -> dict:
    """Run ``model`` over ``batches`` of ``(x, y, index)`` and write ``features.npy`` [N, C]
    and ``logits.npy`` [N, K] (float32) into ``out_dir`` as they come; return timing stats.

    ``keep_maps=True`` also writes the raw target-layer output to ``maps.npy`` [N, C, h, w]
    (before ``activation``, as the model's own head receives it), after checking that
    ``out_dir``'s disk has room for it. Raises :class:`CfdebugError` when the batches do not
    cover all ``n_items`` rows.
    """

    def pool(fmap: torch.Tensor) -> torch.Tensor:  # [B, C, h, w] → [B, C]
        if activation is not None:
            fmap = activation(fmap)
        return fmap.float().mean(dim=(2, 3))

    # With maps, the hook keeps a float32 copy of the output (a later in-place op cannot change it).
    reduce = (lambda fmap: fmap.to(torch.float32, copy=True)) if keep_maps else pool
    feats = logits_mm = maps_mm = None
    written = np.zeros(n_items, dtype=bool)
    done, start = 0, time.perf_counter()
    model.eval()
    with torch.inference_mode(), capture(model, layer, reduce=reduce) as cap:
        for x, _, index in batches:
            logits = model(x.to(device, non_blocking=True)).float()
            out = cap.activations[layer]
            pooled = pool(out) if keep_maps else out
            _check_finite_outputs(logits, pooled, index)
            if feats is None:
                shapes = {"features": (n_items, pooled.shape[1]), "logits": (n_items, logits.shape[1])}
                if keep_maps:
                    shapes["maps"] = _map_shape(n_items, out)
                mapped = _reserved_memmaps(out_dir, shapes)
                feats, logits_mm, maps_mm = mapped["features"], mapped["logits"], mapped.get("maps")
            idx = index.numpy()
            feats[idx] = pooled.cpu().numpy()
            logits_mm[idx] = logits.cpu().numpy()
            if maps_mm is not None:
                maps_mm[idx] = out.cpu().numpy()
            written[idx] = True
            done += len(idx)
            if progress:
                progress(done / n_items, f"{done}/{n_items} images")
    seconds = time.perf_counter() - start
    for mm in (feats, logits_mm, maps_mm):
        if mm is not None:
            mm.flush()
    del feats, logits_mm, maps_mm
    if not written.all():
        raise CfdebugError(
            f"Expected the data loader to yield all {n_items} images of the split, but {int((~written).sum())} "
            "rows were never written (the dataset's length and its indices disagree). Nothing was cached."
        )
    return {"seconds": seconds, "images_per_s": done / seconds if seconds > 0 else float("nan"), "n": done}


def _check_finite_outputs(logits: torch.Tensor, pooled: torch.Tensor, index: torch.Tensor) -> None:
    """Refuse NaN/inf logits or features ([B, K], [B, C]): argmax would call every such image
    class 0, and every later stage (CFE heads, flags) would be fitted to garbage."""
    bad = ~(torch.isfinite(logits).all(1) & torch.isfinite(pooled).all(1))
    if bool(bad.any()):
        first = int(index[bad.nonzero()[0, 0].item()])
        raise CfdebugError(
            f"Expected finite logits and target-layer features, but the model's outputs are not finite "
            f"(NaN or inf) for {int(bad.sum())} image(s) of a batch, e.g. image {first} of the split. The weights "
            "overflow or the input normalisation is off; check `--weights`, `--mean` and `--std`. Nothing was cached."
        )


def _map_shape(n_items: int, fmap: torch.Tensor) -> tuple[int, ...]:
    """``(N, C, h, w)`` for the maps file of ``n_items`` images, from a batch's maps ``fmap`` [B, C, h, w]."""
    if fmap.ndim != 4:
        raise CfdebugError(f"Expected the target layer to output a feature map [B, C, h, w], but got shape {tuple(fmap.shape)}")
    return (n_items, *fmap.shape[1:])


def _reserved_memmaps(out_dir: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.memmap]:
    """One float32 ``<name>.npy`` memory map per entry of ``shapes``, in ``out_dir``, its disk
    blocks reserved before anything is written into it.

    Writing into a memory-mapped page that the disk cannot hold kills the process with SIGBUS
    (no message, the temporary folder left behind); a disk without room for all of them is
    refused up front, and the reservation (``posix_fallocate``) turns a disk that fills in the
    meantime into a clear error as well.
    """
    need = sum(4 * int(np.prod(shape, dtype=np.int64)) + 128 for shape in shapes.values())  # + the .npy headers
    free = shutil.disk_usage(out_dir).free
    if need > free:
        what = f"the target feature maps {shapes['maps']}" if "maps" in shapes else f"the features {shapes['features']} and logits {shapes['logits']}"
        raise CfdebugError(
            f"Caching {what} needs {format_bytes(need)}, but only {format_bytes(free)} are free under "
            f"{out_dir.parent}. Free some space or pass another `--workdir`."
        )
    arrays = {}
    for name, shape in shapes.items():
        path = out_dir / f"{name}.npy"
        arrays[name] = open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
        if not hasattr(os, "posix_fallocate"):  # macOS: the free-space check above is what there is
            continue
        try:
            with open(path, "r+b") as handle:
                os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                arrays.clear()  # unmapped before the temporary folder is removed
                raise no_space_error(out_dir.parent, need, "pass another `--workdir`") from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            # a file system without reservations: the free-space check above is what there is
    return arrays


class ExtractionCache:
    """Per-workspace access to extractions; computes on a miss, loads on a hit."""

    KIND = "extract"
    MAPS_KIND = "fmaps"

    def __init__(self, workspace):
        self.ws = workspace

    def _batches(self, split: str):
        """A loader of ``(x, y, index)`` batches over ``split`` and the split's size."""
        ws = self.ws
        dataset = ws.data.torch_split(split)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=ws.config.extract.batch_size,
            num_workers=ws.config.extract.num_workers,
            pin_memory=ws.device.type == "cuda",
        )
        return loader, len(dataset)

    def key(self, split: str) -> str:
        return stable_hash(self.KIND, self.ws.key_parts, split, "v1")

    def get(self, split: str, progress: Progress | None = None) -> Extraction:
        ws = self.ws
        key = self.key(split)
        hit = ws.store.exists(self.KIND, key)
        if not hit:
            data = ws.data
            batches, n = self._batches(split)
            meta = {"split": split, "key_parts": ws.key_parts, "classes": list(data.classes)}
            with ws.store.writer(self.KIND, key, meta) as tmp:
                stats = stream_features(ws.model, ws.target.name, batches, n, tmp, ws.device, ws.target.activation, progress)
                meta.update(stats)
                np.save(tmp / "labels.npy", data.splits[split].labels)
                np.save(tmp / "ids.npy", np.asarray(data.splits[split].ids))
        arrays, meta = ws.store.load_arrays(self.KIND, key)
        return Extraction(
            split=split,
            features=arrays["features"],
            logits=arrays["logits"],
            labels=arrays["labels"],
            ids=arrays["ids"],
            meta=meta,
            cache_hit=hit,
            path=ws.store.path(self.KIND, key),
        )

    def maps(self, split: str, progress: Progress | None = None) -> np.ndarray:
        """The raw target feature maps of ``split``, ``[N, C, h, w]`` float32, memory-mapped
        read-only (computed on the first call, in one streaming pass, and cached)."""
        ws = self.ws
        key = stable_hash(self.MAPS_KIND, ws.key_parts, split, "v1")
        if not ws.store.exists(self.MAPS_KIND, key):
            batches, n = self._batches(split)
            meta = {"split": split, "key_parts": ws.key_parts}
            with ws.store.writer(self.MAPS_KIND, key, meta) as tmp:
                report = (lambda frac, text: progress(frac, f"caching {split} feature maps: {text}")) if progress else None
                stats = stream_features(ws.model, ws.target.name, batches, n, tmp, ws.device, ws.target.activation, report, keep_maps=True)
                meta.update(stats)
                (tmp / "features.npy").unlink()  # the pooled features live in the extraction artifact
                (tmp / "logits.npy").unlink()
        return np.load(ws.store.path(self.MAPS_KIND, key) / "maps.npy", mmap_mode="r")
