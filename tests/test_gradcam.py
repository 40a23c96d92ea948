"""Grad-CAM: batched equals one-at-a-time, values in [0, 1], matches a hand computation, no hooks left."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cfdebug.errors import CfdebugError
from cfdebug.gradcam import gradcam, overlay
from cfdebug.hooks import count_hooks


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3)))


def test_batched_equals_single_and_is_normalised():
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.randn(6, 3, 8, 8)
    targets = model(x).argmax(1)
    batched = gradcam(model, "relu", x, targets, torch.device("cpu"), batch_size=4)
    single = np.concatenate([gradcam(model, "relu", x[i : i + 1], targets[i : i + 1], torch.device("cpu")) for i in range(6)])
    assert batched.shape == (6, 8, 8)
    np.testing.assert_allclose(batched, single, atol=1e-6)
    assert batched.min() >= 0 and batched.max() <= 1 + 1e-6
    assert count_hooks(model) == 0
    assert model.relu.inplace is True  # restored
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again


def test_matches_hand_computed_gradcam():
    torch.manual_seed(1)
    model = Tiny().eval()
    x = torch.randn(1, 3, 8, 8)
    a = torch.relu(model.conv(x))  # [1, 4, 8, 8]
    target = 2
    # For GAP + linear, d logit / d A_k(i,j) = w_k / (h*w); channel weights are its spatial mean.
    weights = model.fc.weight[target] / 64.0
    cam = torch.relu((weights.view(1, 4, 1, 1) * a).sum(1))[0]
    expected = (cam / cam.max()).detach().numpy()
    got = gradcam(model, "relu", x, [target], torch.device("cpu"))[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_bad_layer_and_shapes():
    model = Tiny()
    with pytest.raises(CfdebugError, match="no module named"):
        gradcam(model, "nope", torch.zeros(1, 3, 8, 8), [0], torch.device("cpu"))
    with pytest.raises(CfdebugError, match="targets"):
        gradcam(model, "relu", torch.zeros(2, 3, 8, 8), [0], torch.device("cpu"))


def test_overlay_shape_and_dtype():
    image = np.zeros((32, 32, 3), np.uint8)
    out = overlay(image, np.ones((8, 8)))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8 and out.max() > 0
