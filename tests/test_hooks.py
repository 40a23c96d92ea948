"""The one hook context manager: what it captures, and that it never leaves a hook behind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cfdebug.errors import CfdebugError
from cfdebug.hooks import capture, count_hooks


class TinyNet(nn.Module):
    """conv(3→2, 1×1, hand-set) → ReLU → GAP → linear(2→2, hand-set)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 0.0]]).view(2, 3, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, 2.0], [-1.0, 0.5]]))
            self.fc.bias.copy_(torch.tensor([0.25, -0.5]))

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


def _image() -> torch.Tensor:
    # [1, 3, 2, 2]: channel c holds c+1 everywhere except one pixel
    x = torch.ones(1, 3, 2, 2) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    x[0, 1, 0, 0] = 0.0
    return x


def test_capture_stores_activations():
    model = TinyNet().eval()
    x = _image()
    with torch.no_grad(), capture(model, ["conv", "relu"]) as cap:
        model(x)
    conv_out = cap.activations["conv"]
    assert conv_out.shape == (1, 2, 2, 2)
    # channel 0: sum of the channels = 6 (4 at the pixel where channel 1 is 0)
    expected0 = torch.tensor([[4.0, 6.0], [6.0, 6.0]])
    # channel 1: c0 - c1 = -1 (1 where channel 1 is 0)
    expected1 = torch.tensor([[1.0, -1.0], [-1.0, -1.0]])
    torch.testing.assert_close(conv_out[0, 0], expected0)
    torch.testing.assert_close(conv_out[0, 1], expected1)
    torch.testing.assert_close(cap.activations["relu"][0, 1], expected1.clamp(min=0))
    assert not cap.activations["conv"].requires_grad


def test_capture_single_name_string():
    model = TinyNet().eval()
    with torch.no_grad(), capture(model, "relu") as cap:
        model(_image())
    assert set(cap.activations) == {"relu"}


def test_reduce_pools_what_is_stored():
    model = TinyNet().eval()
    with torch.no_grad(), capture(model, "relu", reduce=lambda t: t.mean(dim=(2, 3))) as cap:
        model(_image())
    pooled = cap.activations["relu"]
    assert pooled.shape == (1, 2)
    torch.testing.assert_close(pooled, torch.tensor([[22.0 / 4, 1.0 / 4]]))


def test_edit_replaces_output_and_changes_logits():
    model = TinyNet().eval()
    x = _image()
    with torch.no_grad():
        plain = model(x)
        with capture(model, "relu", edit=lambda name, out: out * torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)) as cap:
            edited = model(x)
    # channel 1 zeroed: logits = W[:, 0] * 23/4 + b
    expected = torch.tensor([[22.0 / 4 + 0.25, -22.0 / 4 - 0.5]])
    torch.testing.assert_close(edited, expected)
    assert not torch.allclose(plain, edited)
    assert cap.activations["relu"][0, 1].abs().sum() == 0  # the stored output is the edited one
    assert count_hooks(model) == 0
    torch.testing.assert_close(model(x).detach(), plain)  # no lasting effect


def test_gradients_are_stored():
    model = TinyNet().eval()
    x = _image()
    with capture(model, "relu", gradients=True) as cap:
        logits = model(x)
        logits[0, 0].backward()
    grad = cap.gradients["relu"]
    assert grad.shape == (1, 2, 2, 2)
    # d logit0 / d relu_out = W[0, c] / (h*w)
    expected = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2) / 4
    torch.testing.assert_close(grad, expected)
    assert count_hooks(model) == 0


def test_no_gradients_without_flag():
    model = TinyNet().eval()
    with capture(model, "relu") as cap:
        model(_image())[0, 0].backward()
    assert cap.gradients == {}


def test_detach_false_keeps_graph():
    model = TinyNet().eval()
    with capture(model, "relu", detach=False) as cap:
        model(_image())
    assert cap.activations["relu"].requires_grad


def test_no_hooks_after_success():
    model = TinyNet()
    before = count_hooks(model)
    with capture(model, ["conv", "relu", "fc"], gradients=True) as _:
        assert count_hooks(model) == before + 3
        model(_image()).sum().backward()
    assert count_hooks(model) == before == 0


def test_no_hooks_after_exception_in_with_block():
    model = TinyNet()
    with pytest.raises(RuntimeError, match="inside the block"):
        with capture(model, ["conv", "relu"], reduce=lambda t: t.mean()):
            assert count_hooks(model) == 2
            raise RuntimeError("inside the block")
    assert count_hooks(model) == 0


def test_no_hooks_after_exception_in_forward():
    model = TinyNet()

    def broken_edit(name, out):
        raise ValueError("edit failed in the forward pass")

    with pytest.raises(ValueError, match="forward pass"):
        with capture(model, "relu", edit=broken_edit):
            model(_image())
    assert count_hooks(model) == 0

    class Exploding(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model.fc = Exploding()
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, ["conv", "relu"]):
            model(_image())
    assert count_hooks(model) == 0


def test_unknown_layer_raises_and_registers_nothing():
    model = TinyNet()
    with pytest.raises(CfdebugError, match="no_such_layer"):
        with capture(model, ["conv", "no_such_layer"]):
            pass  # pragma: no cover
    assert count_hooks(model) == 0


def test_user_hooks_are_left_alone():
    model = TinyNet()
    handle = model.conv.register_forward_hook(lambda *a: None)
    try:
        with capture(model, "conv"):
            model(_image())
        assert count_hooks(model) == 1
    finally:
        handle.remove()
