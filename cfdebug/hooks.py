"""The one context manager that registers forward hooks, and removes them whatever happens.

Hooks are registered inside ``try`` and removed in ``finally`` (the pattern of captum's
``_forward_layer_distributed_eval`` and pytorch-grad-cam's ``ActivationsAndGradients``), so
an exception in the forward pass never leaves a hook behind on the user's model.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .errors import CfdebugError


@dataclass
class Captured:
    """What the hooks saw in the latest forward (and backward) pass, by module name."""

    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    gradients: dict[str, torch.Tensor] = field(default_factory=dict)


@contextmanager
def capture(
    model: nn.Module,
    layers: Sequence[str] | str,
    *,
    gradients: bool = False,
    edit: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    detach: bool = True,
) -> Iterator[Captured]:
    """Capture the outputs of ``layers`` during forward passes inside the ``with`` block.

    ``edit(name, output)`` may return a replacement output (channel masks for the CFE heads and
    treatment); ``reduce`` maps the output to what is stored (global average pooling in
    extraction, so a full feature map is never kept); ``gradients`` also stores the gradient
    w.r.t. each output on backward (Grad-CAM). ``detach=False`` keeps the autograd graph.
    """
    names = [layers] if isinstance(layers, str) else list(layers)
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            raise CfdebugError(f"The model has no module named {name!r}; cannot hook it.")
    captured = Captured()
    handles = []

    def make_hook(name: str):
        def hook(_module, _inputs, output):
            if edit is not None:
                output = edit(name, output)
            stored = reduce(output) if reduce is not None else output
            captured.activations[name] = stored.detach() if detach else stored
            if gradients and output.requires_grad:
                def keep_grad(grad, name=name):
                    captured.gradients[name] = grad.detach()
                output.register_hook(keep_grad)
            return output if edit is not None else None

        return hook

    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def count_hooks(model: nn.Module) -> int:
    """How many forward/backward hooks are registered on ``model``'s modules (for tests)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
