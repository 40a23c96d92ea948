"""A workspace: one model on one dataset on one device, with its artifact cache.

The CLI and the dashboard both start here. The demo CNN without ``--weights`` is trained on
first use and cached under a key of the data fingerprint and training config, so every later
command (and every browser session) reuses the same weights.
"""

from __future__ import annotations

import warnings
from functools import cached_property

import torch

from .config import DEMO_DATASETS, ModelConfig, WorkspaceConfig, config_dict
from .data import DataBundle, load_data
from .errors import CfdebugError
from .models import DEMO_MODEL, TargetLayer, build_model, load_model, load_weights, read_state_dict, resolve_target
from .runtime import resolve_device, seed_everything
from .store import Store, file_digest, stable_hash
from .training import Progress, TrainResult, train_classifier


class Workspace:
    """Loads data and model once; hands out cached artifacts (extractions, …)."""

    def __init__(self, config: WorkspaceConfig | None = None, progress: Progress | None = None, *, train: bool = False):
        """``train=True`` trains the model (from ``--weights`` when given) unless a trained copy
        with the same inputs is cached; the demo CNN without weights is always trained."""
        self.config = config or WorkspaceConfig()
        self.train_requested = train
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

    def _load_model(self, progress):
        cfg, data = self.config.model, self.data
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
        return stable_hash("trained", cfg.name, initial, d.fingerprint, d.input_size, d.mean, d.std, config_dict(self.config.train))

    def _cached_trained_model(self, cfg: ModelConfig, progress):
        key = self.trained_model_key()
        seed_everything(self.config.train.seed)  # the initial weights depend on the seed, as the key says
        model = load_model(cfg, self.data.num_classes) if cfg.weights else build_model(cfg.name, self.data.num_classes)
        if not self.store.exists("models", key):
            result = train_and_cache(self, model, key, progress)
            meta = {"accuracy": result.accuracy, "history": result.history, "cache_hit": False}
        else:
            meta = dict(self.store.load_meta("models", key), cache_hit=True)
            load_weights(model, read_state_dict(self.store.path("models", key) / "model.pt"), "The cached demo model")
        return model.eval(), key, meta

    @cached_property
    def extractions(self):
        from .extract import ExtractionCache

        return ExtractionCache(self)


def train_and_cache(ws: "Workspace", model: torch.nn.Module, key: str, progress) -> TrainResult:
    """Train ``model`` on the workspace data and store it under ``models/<key>``."""
    device = resolve_device(ws.config.device)
    result = train_classifier(model, ws.data, ws.config.train, device, progress)
    meta = {
        "model": config_dict(ws.config.model),
        "data": config_dict(ws.config.data),
        "train": config_dict(ws.config.train),
        "accuracy": result.accuracy,
        "history": result.history,
        "best_epoch": result.best_epoch,
    }
    with ws.store.writer("models", key, meta) as tmp:
        torch.save(result.state_dict, tmp / "model.pt")
    return result


def is_demo(config: WorkspaceConfig) -> bool:
    return config.model.name == DEMO_MODEL and config.data.source in DEMO_DATASETS


__all__ = ["Workspace", "train_and_cache", "is_demo", "CfdebugError"]
