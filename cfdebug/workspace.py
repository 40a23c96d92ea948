"""A workspace: one model on one dataset on one device, with its artifact cache.

The CLI and the dashboard both start here. The demo CNN without ``--weights`` on an embedded
bed loads the model shipped in ``assets/models/`` when the asset's JSON says it was trained on
the same data with the same training config, so every machine shows the same numbers; otherwise
(and always for ``train=True``) it is trained on first use and cached under a key of the data
fingerprint, training config and thread count, so every later command (and every browser
session) reuses the same weights. Demo-CNN training runs on a fixed number of CPU threads with
deterministic algorithms (:func:`cfdebug.runtime.fixed_threads`).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import warnings
from contextlib import nullcontext
from functools import cached_property
from pathlib import Path

import torch

from .config import DEMO_DATASETS, DataConfig, ModelConfig, WorkspaceConfig, config_dict
from .data import DataBundle, load_data
from .errors import CfdebugError
from .models import DEMO_MODEL, TargetLayer, build_model, load_model, load_weights, read_state_dict, resolve_target
from .runtime import Progress, fixed_threads, resolve_device, seed_everything
from .store import Store, atomic_file, file_digest, stable_hash, write_json_atomic
from .training import TrainResult, train_classifier

# The demo CNN always trains on this many CPU threads: a parallel reduction's order, and so the
# weights, depend on the thread count. One thread is also the only count every machine has.
DEMO_THREADS = 1
ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "models"


class ModelNotTrained(Exception):
    """Raised by a ``Workspace(..., cached_only=True)`` whose model would have to be trained first
    (not a user mistake: the dashboard trains it in a background run, then opens the workspace)."""


class Workspace:
    """Loads data and model once; hands out cached artifacts (extractions, …)."""

    def __init__(self, config: WorkspaceConfig | None = None, progress: Progress | None = None, *, train: bool = False, cached_only: bool = False):
        """``train=True`` trains the model (from ``--weights`` when given) unless a trained copy
        with the same inputs is cached; the demo CNN without weights is always trained.
        ``cached_only=True`` raises :class:`ModelNotTrained` instead of training."""
        self.config = config or WorkspaceConfig()
        self.train_requested = train
        self.cached_only = cached_only
        self.store = Store(self.config.workdir)
        self.device = resolve_device(self.config.device)
        self.data: DataBundle = load_data(self.config.data)
        self.model, self.model_digest, self.model_meta = self._load_model(progress)
        self.model.to(self.device).eval()
        self.target: TargetLayer = resolve_target(self.model, self.config.model.layer)

    @property
    def key_parts(self) -> dict:
        """What every artifact of this workspace depends on."""
        d = self.data
        return {
            "model": self.model_digest,
            "layer": self.target.name,
            "data": d.fingerprint,
            "transform": [d.input_size, list(d.mean), list(d.std)],
        }

    @property
    def random_weights(self) -> bool:
        """True when the model is a torchvision builder's random initialisation (no weights given)."""
        return self.model_meta.get("source") == "random init"

    def trained_weights_path(self) -> Path:
        """Where :meth:`trained_model_key`'s trained state_dict is (or will be) stored."""
        return self.store.path("models", self.trained_model_key()) / "model.pt"

    def _load_model(self, progress):
        cfg, data = self.config.model, self.data
        if not self.train_requested and is_demo(self.config) and not cfg.weights:
            shipped = self._shipped_model()
            if shipped is not None:
                return shipped
        if self.train_requested or (cfg.name == DEMO_MODEL and not cfg.weights):
            return self._cached_trained_model(cfg, progress)
        if cfg.weights:
            model = load_model(cfg, data.num_classes)
            return model, file_digest(cfg.weights), {"source": cfg.weights}
        seed_everything(self.config.train.seed)
        model = build_model(cfg.name, data.num_classes).eval()  # an unknown name fails before any warning
        warnings.warn(
            f"No `--weights` given: {cfg.name} has random weights. Train it with "
            f"`python -m cfdebug train --model {cfg.name} --data …` or pass a checkpoint."
        )
        return model, stable_hash(cfg.name, "random-init", self.config.train.seed, data.num_classes), {"source": "random init"}

    def trained_model_key(self) -> str:
        d, cfg = self.data, self.config.model
        initial = file_digest(cfg.weights) if cfg.weights else None
        parts = ["trained", cfg.name, initial, d.fingerprint, d.input_size, d.mean, d.std, config_dict(self.config.train)]
        threads = training_threads(self.config)
        if threads is not None:  # only the demo CNN trains on fixed threads; other keys stay as they were
            parts.append({"threads": threads})
        return stable_hash(*parts)

    def _shipped_model(self):
        """The demo CNN shipped for this bed, when its JSON matches this workspace; else ``None``."""
        weights, record_path = demo_asset_paths(self.config.data.source)
        if not (weights.is_file() and record_path.is_file()):
            return None
        record = json.loads(record_path.read_text())
        if record.get("key") != self.trained_model_key():
            return None  # other data, transform or training config: train as for any other setting
        sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
        if sha256 != record.get("sha256"):
            warnings.warn(
                f"The shipped model {weights} does not match the sha256 in {record_path.name} (a damaged or "
                "partial checkout?); training the demo CNN instead. `git checkout assets/models` restores it."
            )
            return None
        model = build_model(DEMO_MODEL, self.data.num_classes)
        load_weights(model, read_state_dict(weights), "The shipped demo model")
        meta = {key: record[key] for key in ("accuracy", "history", "best_epoch", "torch", "threads")}
        # The digest is the file's (as for --weights), not the training key: a model trained here
        # under the same key may differ in the last bits, and its artifacts must not be shared.
        return model.eval(), sha256[:20], dict(meta, source="asset", asset=str(weights), cache_hit=True)

    def _cached_trained_model(self, cfg: ModelConfig, progress):
        key = self.trained_model_key()
        if self.cached_only and not self.store.exists("models", key):
            raise ModelNotTrained(f"{cfg.name} is not trained on {self.data.name} yet (models/{key})")
        seed_everything(self.config.train.seed)  # the initial weights depend on the seed, as the key says
        model = load_model(cfg, self.data.num_classes) if cfg.weights else build_model(cfg.name, self.data.num_classes)
        if not self.store.exists("models", key):
            result = train_and_cache(self, model, key, progress)
            meta = {"accuracy": result.accuracy, "history": result.history, "best_epoch": result.best_epoch, "cache_hit": False}
        else:
            meta = dict(self.store.load_meta("models", key), cache_hit=True)
            load_weights(model, read_state_dict(self.store.path("models", key) / "model.pt"), "The cached demo model")
        return model.eval(), key, meta

    @cached_property
    def extractions(self):
        from .extract import ExtractionCache

        return ExtractionCache(self)


def training_threads(config: WorkspaceConfig) -> int | None:
    """CPU threads the model of ``config`` trains on: :data:`DEMO_THREADS` for the demo CNN,
    ``None`` (torch's setting, unchanged) for others, whose training one thread would slow too much."""
    return DEMO_THREADS if config.model.name == DEMO_MODEL else None


def train_and_cache(ws: "Workspace", model: torch.nn.Module, key: str, progress) -> TrainResult:
    """Train ``model`` on the workspace data and store it under ``models/<key>``."""
    device = resolve_device(ws.config.device)
    threads = training_threads(ws.config)
    # Deterministic algorithms would need a cuBLAS workspace setting on CUDA; on CPU they are free.
    reproducible = nullcontext() if threads is None else fixed_threads(threads, deterministic=device.type == "cpu")
    with reproducible:
        result = train_classifier(model, ws.data, ws.config.train, device, progress)
    meta = {
        "model": config_dict(ws.config.model),
        "data": config_dict(ws.config.data),
        "train": config_dict(ws.config.train),
        "accuracy": result.accuracy,
        "history": result.history,
        "best_epoch": result.best_epoch,
        "threads": threads,
        "torch": torch.__version__,
    }
    with ws.store.writer("models", key, meta) as tmp:
        torch.save(result.state_dict, tmp / "model.pt")
    return result


def is_demo(config: WorkspaceConfig) -> bool:
    return config.model.name == DEMO_MODEL and config.data.source in DEMO_DATASETS


def demo_asset_paths(bed: str, directory: str | Path | None = None) -> tuple[Path, Path]:
    """The shipped demo CNN for embedded bed ``bed``: ``(state_dict .pt, record .json)`` in
    ``directory`` (default :data:`ASSET_DIR`, looked up at call time)."""
    stem = Path(ASSET_DIR if directory is None else directory) / f"{DEMO_MODEL}_{bed}"
    return stem.parent / f"{stem.name}.pt", stem.parent / f"{stem.name}.json"


def pixels_sha256(data: DataBundle) -> str:
    """SHA-256 of an in-memory bed's pixels, train, val and test in order.

    The embedded beds' fingerprints name how they were built, not their pixels, which also depend
    on scikit-learn's bundled digits and Pillow's resampling; an asset records this to show that
    it is evaluated on the pixels it was trained on.
    """
    digest = hashlib.sha256()
    for split in ("train", "val", "test"):
        digest.update(data.splits[split].images.tobytes())
    return digest.hexdigest()


def write_demo_asset(bed: str, directory: str | Path | None = None, progress: Progress | None = None) -> dict:
    """Train the demo CNN on ``bed`` from scratch and write it as a shipped asset; return the record.

    Trains with the default configs on CPU in a throwaway workdir (never a cached or GPU-trained
    copy), on :data:`DEMO_THREADS` threads with deterministic algorithms. Writes the state_dict
    (``demo-cnn_<bed>.pt``, well under 1 MB) and beside it a JSON record of how it was made, its
    accuracies and the sha256 the workspace checks before loading it.
    """
    if bed not in DEMO_DATASETS:
        raise CfdebugError(f"Expected an embedded dataset, one of {', '.join(DEMO_DATASETS)}, but got {bed!r}.")
    weights, record_path = demo_asset_paths(bed, directory)
    with tempfile.TemporaryDirectory(prefix="cfdebug-asset-") as workdir:
        config = WorkspaceConfig(data=DataConfig(source=bed), device="cpu", workdir=workdir)
        ws = Workspace(config, progress, train=True)
        trained = ws.store.path("models", ws.model_digest) / "model.pt"
        payload = trained.read_bytes()  # saved to a file named model.pt, so its bytes do not depend on the path
        with atomic_file(weights) as tmp:
            tmp.write_bytes(payload)
    meta = ws.model_meta
    record = {
        "model": DEMO_MODEL,
        "data": bed,
        "command": f"make assets  (cfdebug.workspace.write_demo_asset({bed!r}))",
        "same_as": f"python -m cfdebug train --data {bed} --device cpu",
        "seed": config.train.seed,
        "train_config": config_dict(config.train),
        "data_config": config_dict(config.data),
        "torch": torch.__version__,
        "threads": DEMO_THREADS,
        "deterministic_algorithms": True,
        "data_fingerprint": ws.data.fingerprint,
        "pixels_sha256": pixels_sha256(ws.data),
        "key": ws.model_digest,
        "accuracy": meta["accuracy"],
        "test_errors": int(round((1.0 - meta["accuracy"]["test"]) * len(ws.data.splits["test"]))),
        "history": meta["history"],
        "best_epoch": meta["best_epoch"],
        "bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    write_json_atomic(record_path, record)
    return record


def write_demo_assets(directory: str | Path | None = None, beds=DEMO_DATASETS) -> list[dict]:
    """``make assets``: :func:`write_demo_asset` for every embedded bed, one summary line each."""
    records = []
    for bed in beds:
        record = write_demo_asset(bed, directory)
        acc = record["accuracy"]
        print(f"{bed}: train {acc['train']:.4f} val {acc['val']:.4f} test {acc['test']:.4f}; {record['bytes']} bytes")
        records.append(record)
    return records


__all__ = ["Workspace", "ModelNotTrained", "train_and_cache", "is_demo", "training_threads", "demo_asset_paths", "pixels_sha256", "write_demo_asset", "write_demo_assets", "CfdebugError"]
