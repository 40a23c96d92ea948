"""One streaming pass over a dataset split: pooled target-layer features, logits, labels.

The target layer's output is average-pooled on the device inside the hook, so a full feature
map never leaves the forward pass, and each batch is written straight into memory-mapped
``.npy`` files in the artifact's temporary folder: memory does not grow with the dataset.
The artifact is keyed by the model weights, target layer, dataset fingerprint and transform.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from numpy.lib.format import open_memmap

from .hooks import capture
from .store import stable_hash

Progress = Callable[[float, str], None]


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
        z = self.logits - self.logits.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

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
) -> dict:
    """Run ``model`` over ``batches`` of ``(x, y, index)`` and write ``features.npy`` and
    ``logits.npy`` into ``out_dir`` as they come; return timing stats."""

    def pool(fmap: torch.Tensor) -> torch.Tensor:  # [B, C, h, w] → [B, C]
        if activation is not None:
            fmap = activation(fmap)
        return fmap.float().mean(dim=(2, 3))

    feats = logits_mm = None
    done, start = 0, time.perf_counter()
    model.eval()
    with torch.inference_mode(), capture(model, layer, reduce=pool) as cap:
        for x, _, index in batches:
            logits = model(x.to(device, non_blocking=True)).float()
            pooled = cap.activations[layer]
            if feats is None:
                feats = open_memmap(out_dir / "features.npy", mode="w+", dtype=np.float32, shape=(n_items, pooled.shape[1]))
                logits_mm = open_memmap(out_dir / "logits.npy", mode="w+", dtype=np.float32, shape=(n_items, logits.shape[1]))
            idx = index.numpy()
            feats[idx] = pooled.cpu().numpy()
            logits_mm[idx] = logits.cpu().numpy()
            done += len(idx)
            if progress:
                progress(done / n_items, f"{done}/{n_items} images")
    seconds = time.perf_counter() - start
    if feats is not None:
        feats.flush()
        logits_mm.flush()
        del feats, logits_mm
    return {"seconds": seconds, "images_per_s": done / seconds if seconds > 0 else float("nan"), "n": done}


class ExtractionCache:
    """Per-workspace access to extractions; computes on a miss, loads on a hit."""

    KIND = "extract"

    def __init__(self, workspace):
        self.ws = workspace

    def key(self, split: str) -> str:
        return stable_hash(self.KIND, self.ws.key_parts, split, "v1")

    def get(self, split: str, progress: Progress | None = None) -> Extraction:
        ws = self.ws
        key = self.key(split)
        hit = ws.store.exists(self.KIND, key)
        if not hit:
            data = ws.data
            dataset = data.torch_split(split)
            batches = torch.utils.data.DataLoader(
                dataset,
                batch_size=ws.config.extract.batch_size,
                num_workers=ws.config.extract.num_workers,
                pin_memory=ws.device.type == "cuda",
            )
            meta = {"split": split, "key_parts": ws.key_parts, "classes": list(data.classes)}
            with ws.store.writer(self.KIND, key, meta) as tmp:
                stats = stream_features(ws.model, ws.target.name, batches, len(dataset), tmp, ws.device, ws.target.activation, progress)
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
