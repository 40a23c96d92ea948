"""The model registry: the demo CNN, torchvision builders by name, checkpoints, target layers.

A model is split in three for paper A: the *body* up to the target layer (the last
convolutional block), the target layer whose channels are the "filters", and the *head*
after it. For the families we know, the head after global average pooling is a module we can
call on cached pooled features ``g(x)`` [B, C] (``pooled_head``); torchvision's VGG pools to
7×7 instead, so its head runs on feature maps (``map_head``).

Two registries, one lookup each (as timm's and torchvision's ``get_model``): :data:`BUILDERS`
(name → builder of the models that are not torchvision's; every other name is a torchvision
builder) and :data:`TARGET_RULES` (architecture → where its filters are and its head).
"""

from __future__ import annotations

import difflib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import CfdebugError

DEMO_MODEL = "demo-cnn"


class DemoCNN(nn.Module):
    """A small VGG-style CNN for 32×32 RGB: three blocks of two 3×3 conv+BN+ReLU, GAP, linear.

    ``features`` ends in the target ReLU (``features.19``, 64 filters at width 16);
    ``classifier`` is the linear layer on the pooled ``[B, 64]`` features.
    """

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        widths = [width, 2 * width, 4 * width]
        layers: list[nn.Module] = []
        in_ch = 3
        for block, out_ch in enumerate(widths):
            for conv_in in (in_ch, out_ch):
                layers += [nn.Conv2d(conv_in, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()]
            if block < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` normalised → logits ``[B, K]``."""
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


#: Builders of the models that are not torchvision's: name → ``builder(num_classes)``.
BUILDERS: dict[str, Callable[[int], nn.Module]] = {DEMO_MODEL: DemoCNN}
#: Arguments a torchvision builder needs besides ``num_classes`` (no auxiliary heads, whose
#: default weights init needs scipy's truncated normal).
_TORCHVISION_KWARGS: dict[str, dict] = {
    "inception_v3": {"aux_logits": False, "init_weights": False},
    "googlenet": {"aux_logits": False, "init_weights": False},
}


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def available_models() -> list[str]:
    return list(BUILDERS) + sorted(_torchvision_names())


def build_model(name: str, num_classes: int) -> nn.Module:
    """Build ``name`` (one of :data:`BUILDERS` or a torchvision classification builder) with random weights.

    Never downloads: torchvision builders are called with ``weights=None``.
    """
    if name in BUILDERS:
        return BUILDERS[name](num_classes)
    names = _torchvision_names()
    if name not in names:
        close = difflib.get_close_matches(name, list(BUILDERS) + names, n=5, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise CfdebugError(
            f"Unknown model {name!r}: expected `demo-cnn` or a torchvision classification builder "
            f"(resnet18, vgg16, densenet121, …).{hint} `python -m cfdebug models` lists them all."
        )
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **_TORCHVISION_KWARGS.get(name, {}))


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read plain tensors from a checkpoint without running any code from it.

    Accepts a ``state_dict``, a dict holding one under ``model`` or ``state_dict``, or a
    TorchScript file (its parameters and buffers). Pickled checkpoints are read with
    ``torch.load(weights_only=True)``, which refuses arbitrary objects.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CfdebugError(f"Checkpoint {path} does not exist. Pass `--weights` the path of a saved state_dict.")
    _check_checkpoint_bytes(path)
    if _is_torchscript(path):
        try:
            scripted = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise CfdebugError(f"Cannot load TorchScript file {path}: {exc}") from exc
        return {k: v.detach().clone() for k, v in scripted.state_dict().items()}
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text or "Unpickler" in text:
            raise CfdebugError(
                f"Refusing checkpoint {path}: it holds pickled Python objects, not plain tensors, and "
                "unpickling them could run code (nothing in it was executed). Save the weights with "
                "`torch.save(model.state_dict(), PATH)` and pass that file."
            ) from None
        raise CfdebugError(f"Cannot read checkpoint {path}: {text.splitlines()[0] if text else exc}.") from None
    if isinstance(payload, dict):
        for key in ("state_dict", "model"):
            if isinstance(payload.get(key), dict):
                payload = payload[key]
                break
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise CfdebugError(
            f"Checkpoint {path} is not a state_dict (a dict of tensors, or one under `model`/`state_dict`). "
            "Save it with `torch.save(model.state_dict(), PATH)`."
        )
    # Checkpoints saved from DataParallel/DDP prefix every key with "module.".
    if payload and all(k.startswith("module.") for k in payload):
        payload = {k[len("module."):]: v for k, v in payload.items()}
    _check_finite(payload, path)
    return payload


def _check_checkpoint_bytes(path: Path) -> None:
    """Refuse a file that cannot be a checkpoint before unpickling it: torch writes a zip archive
    (or, before 1.6, a pickle: protocol 2+ starts with byte 0x80)."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not head:
        raise CfdebugError(f"Checkpoint {path} is empty (0 bytes). Pass `--weights` a file written by `torch.save(model.state_dict(), PATH)`.")
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        raise CfdebugError(
            f"Checkpoint {path} is a damaged zip archive (truncated or cut off while copying). "
            "Copy or save the checkpoint again."
        )
    if not head.startswith((b"PK", b"\x80")):
        raise CfdebugError(
            f"{path} is not a checkpoint: expected a file written by `torch.save` (a zip archive or a "
            f"pickle), but it starts with {head!r}. Pass `--weights` a saved state_dict or TorchScript file."
        )


def _check_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse NaN/inf weights: a model holding them predicts the same class for every image."""
    bad = [k for k, v in state.items() if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())]
    if bad:
        raise CfdebugError(
            f"Expected finite weights in checkpoint {path}, but {len(bad)} of {len(state)} tensors hold values "
            f"that are not finite (NaN or inf): {', '.join(bad[:8])}{', …' if len(bad) > 8 else ''}. "
            "Training probably diverged; use an earlier checkpoint or retrain with a lower learning rate."
        )


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str = "the checkpoint") -> None:
    """Load ``state`` strictly, or raise naming the missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): " + "; ".join(shapes[:5]))
        if missing:
            parts.append(f"missing keys ({len(missing)}): " + ", ".join(missing[:5]))
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:5]))
        raise CfdebugError(
            f"{source} does not fit the model {type(model).__name__} built for this dataset — "
            + " | ".join(parts)
            + ". Check `--model` names the architecture the checkpoint was trained with and that the "
            "dataset has the same number of classes."
        )
    model.load_state_dict(state)


def load_model(config: ModelConfig, num_classes: int) -> nn.Module:
    """Build ``config.name`` for ``num_classes`` and load ``config.weights`` when given; eval mode."""
    model = build_model(config.name, num_classes)
    if config.weights:
        load_weights(model, read_state_dict(config.weights), f"Checkpoint {config.weights}")
    return model.eval()


@dataclass(frozen=True)
class TargetLayer:
    """Where the filters are, and how to finish the forward pass from there.

    ``activation`` is applied to the target output before pooling when the architecture does
    so in its forward (DenseNet's final ReLU). ``pooled_head`` maps ``g(x)`` [B, C] → logits
    [B, K]; ``map_head`` maps the target feature map [B, C, h, w] → logits. Either may be None
    for an architecture we do not know (a layer named with ``--layer``).
    """

    name: str
    channels: int
    activation: Callable[[torch.Tensor], torch.Tensor] | None
    pooled_head: nn.Module | None
    map_head: nn.Module | None


def _last_relu_name(prefix: str, seq: nn.Sequential) -> str | None:
    names = [f"{prefix}.{n}" for n, m in seq.named_children() if isinstance(m, (nn.ReLU, nn.ReLU6))]
    return names[-1] if names else None


def _out_channels(module: nn.Module) -> int:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    if bns and (not convs or list(module.modules()).index(bns[-1]) > list(module.modules()).index(convs[-1])):
        return bns[-1].num_features
    if convs:
        return convs[-1].out_channels
    return 0


class _PooledThen(nn.Module):
    """Feature map → (activation) → global average pool → pooled head."""

    def __init__(self, head: nn.Module, activation=None):
        super().__init__()
        self.head = head
        self.activation = activation

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        if self.activation is not None:
            fmap = self.activation(fmap)
        return self.head(fmap.mean(dim=(2, 3)))


def _demo_target(model: DemoCNN) -> tuple:
    return _last_relu_name("features", model.features), None, model.classifier, None


def _resnet_target(model: nn.Module) -> tuple:
    return "layer4", None, model.fc, None


def _vgg_target(model: nn.Module) -> tuple:
    # VGG pools to 7×7 before its classifier: the head runs on the target's feature maps.
    name = _last_relu_name("features", model.features)
    idx = int(name.split(".")[1])
    return name, None, None, nn.Sequential(*list(model.features)[idx + 1 :], model.avgpool, nn.Flatten(1), model.classifier)


def _densenet_target(model: nn.Module) -> tuple:
    return "features", F.relu, model.classifier, None  # DenseNet's forward applies a ReLU before pooling


def _features_gap_target(model: nn.Module) -> tuple:
    # features → GAP → classifier (MobileNetV2 pools functionally)
    return f"features.{len(model.features) - 1}", None, model.classifier, None


#: Where the filters of an architecture are (its class name, or a base class's): ``rule(model) →
#: (target layer name, activation before pooling or None, pooled head or None, map head or None)``.
#: An architecture without a rule needs its layer named (``--layer``).
TARGET_RULES: dict[str, Callable[[nn.Module], tuple]] = {
    "DemoCNN": _demo_target,
    "ResNet": _resnet_target,  # ResNet, ResNeXt, Wide ResNet
    "VGG": _vgg_target,
    "DenseNet": _densenet_target,
    "EfficientNet": _features_gap_target,  # EfficientNet B0–B7 and V2
    "MobileNetV2": _features_gap_target,
    "MobileNetV3": _features_gap_target,
}


def _target_rule(model: nn.Module) -> Callable[[nn.Module], tuple] | None:
    """The rule of ``model``'s class, or of the nearest base class that has one."""
    return next((TARGET_RULES[cls.__name__] for cls in type(model).__mro__ if cls.__name__ in TARGET_RULES), None)


def resolve_target(model: nn.Module, layer: str | None = None) -> TargetLayer:
    """Find the last convolutional block of ``model`` (:data:`TARGET_RULES`), or use the module named ``layer``."""
    modules = dict(model.named_modules())
    if layer is not None and layer not in modules:
        close = difflib.get_close_matches(layer, list(modules), n=5, cutoff=0.4)
        raise CfdebugError(
            f"The model has no module named {layer!r}. "
            + (f"Close names: {', '.join(close)}. " if close else "")
            + "Use a name from `model.named_modules()` (e.g. features.28 or layer4)."
        )
    rule = _target_rule(model)
    name, act, pooled, mapped = rule(model) if rule is not None else (None, None, None, None)
    if layer is not None and layer != name:
        name, act, pooled, mapped = layer, None, None, None
    if name is None:
        raise CfdebugError(
            f"Cannot find the last convolutional block of {type(model).__name__} automatically. "
            "Name it with `--layer` (a module name from `model.named_modules()`)."
        )
    channels = _out_channels(modules[name]) or _channels_by_probe(model, name)
    if mapped is None and pooled is not None:
        mapped = _PooledThen(pooled, act)
    return TargetLayer(name=name, channels=channels, activation=act, pooled_head=pooled, map_head=mapped)


def _channels_by_probe(model: nn.Module, name: str) -> int:
    from .hooks import capture

    param = next(model.parameters())
    with torch.no_grad(), capture(model, [name]) as cap:
        model(torch.zeros(1, 3, 64, 64, device=param.device))
    out = cap.activations[name]
    if out.dim() != 4:
        raise CfdebugError(f"Module {name!r} outputs shape {tuple(out.shape)}; expected a conv feature map [B, C, H, W]. Choose a convolutional layer with `--layer`.")
    return out.shape[1]
