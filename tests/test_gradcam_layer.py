"""Grad-CAM at a layer whose map carries a location: resnet18's layer4 is 1×1 at 32 px."""

from __future__ import annotations

import torch
import torchvision

from cfdebug.gradcam import MIN_MAP_SIDE, gradcam, layer_map_sizes, usable_gradcam_layer
from cfdebug.hooks import count_hooks


def test_resnet18_at_32_px_draws_grad_cam_at_the_deepest_layer_with_a_usable_map():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()  # random weights: no download
    sizes = layer_map_sizes(model, 32, torch.device("cpu"))
    by_name = {n: (h, w) for n, h, w in sizes}
    assert by_name["layer4"] == (1, 1) and by_name["layer3"] == (2, 2) and by_name["layer2"] == (4, 4) and by_name["layer1"] == (8, 8)
    assert [n for n, _, _ in sizes].index("layer2") < [n for n, _, _ in sizes].index("layer4")  # forward order
    assert count_hooks(model) == 0  # the probe left no hook behind
    assert usable_gradcam_layer(sizes, "layer4") == "layer2"
    assert usable_gradcam_layer(layer_map_sizes(model, 224, torch.device("cpu")), "layer4") == "layer4"  # 7×7: usable
    x = torch.randn(2, 3, 32, 32)
    flat = gradcam(model, "layer4", x, [0, 1], torch.device("cpu"))
    informative = gradcam(model, "layer2", x, [0, 1], torch.device("cpu"))
    assert float(flat.std(axis=(1, 2)).max()) < 1e-6  # a 1×1 map upsampled: one value everywhere
    assert float(informative.std(axis=(1, 2)).max()) > 1e-3  # a 4×4 map: it varies over the image
    assert MIN_MAP_SIDE == 4


def test_a_target_with_a_usable_map_is_kept_and_an_unknown_one_too():
    sizes = [("a", 16, 16), ("b", 8, 8), ("c", 2, 2)]
    assert usable_gradcam_layer(sizes, "b") == "b" and usable_gradcam_layer(sizes, "c") == "b"
    assert usable_gradcam_layer(sizes, "missing") == "missing"
    assert usable_gradcam_layer([("a", 2, 2), ("b", 1, 1)], "b") == "b"  # nothing usable: the target
