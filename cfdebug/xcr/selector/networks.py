"""The selector's two networks: the patch scorer (:class:`PatchSelector`) and the classifier of
``T(x)`` (:class:`Approximator`), both small ResNets (:class:`ResidualBlock`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import check_int
from ..patches import num_patches


def _conv(cin: int, cout: int, kernel: int = 3, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
    padding = dilation * (kernel - 1) // 2 if stride == 1 else 0
    return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ResidualBlock(nn.Module):
    """ResNet basic block: ``[B, cin, H, W]`` → ``[B, cout, H/stride, W/stride]`` float.

    Two 3×3 convolutions with BatchNorm (the first strided, both dilated by ``dilation``) plus a
    shortcut (identity, or a strided 1×1 convolution with BatchNorm when the shape changes).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=dilation, dilation=dilation, bias=False), nn.BatchNorm2d(cout),
        )
        same = stride == 1 and cin == cout
        self.shortcut = nn.Identity() if same else nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


#: Dilations of the selector's residual blocks at patch resolution.
SELECTOR_DILATIONS = (1, 2, 4)


class PatchSelector(nn.Module):
    """Selector CNN: ``[B, C, H, W]`` normalised images → ``log p(x)`` ``[B, d]`` float.

    A ``p×p`` convolution with stride ``p`` embeds each patch (one cell per patch, aligned
    exactly with the patch grid for any ``p``); three residual blocks (:class:`ResidualBlock`)
    with dilation 1, 2, 4 at patch resolution give each patch score a receptive field of 29
    patches (all of a 32×32 image for p=2); a 1×1 convolution to one channel is the patch logit.
    The paper uses a ResNet-18 selector for CIFAR; this ResNet-style one keeps its ingredients
    (residual blocks, BatchNorm) at a size that trains on two CPU cores in well under a minute
    for the demo, which METHODS.md allows (``width`` scales it).
    """

    def __init__(self, patch_size: int = 2, in_channels: int = 3, width: int = 32):
        super().__init__()
        check_int(patch_size, "patch_size", 1)
        self.patch_size = patch_size
        self.patchify = nn.Sequential(*_conv(in_channels, width, kernel=patch_size, stride=patch_size))
        self.context = nn.Sequential(*(ResidualBlock(width, width, dilation=r) for r in SELECTOR_DILATIONS))
        self.score = nn.Conv2d(width, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_patches(x.shape[2], x.shape[3], self.patch_size)
        s = self.score(self.context(self.patchify(x)))  # [B, 1, H/p, W/p]
        return F.log_softmax(s.flatten(1), dim=1)  # [B, d], row-major like apply_mask


class Approximator(nn.Module):
    """Approximator CNN: ``T(x)`` ``[B, C, H, W]`` → class logits ``[B, K]`` float.

    A small ResNet for 32 px inputs: a 3×3 stem convolution (``width`` channels), three residual
    blocks that each halve the resolution and double the width (×2, ×4, ×8), global average
    pooling and a linear layer, so it accepts any input size.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            *_conv(in_channels, width),
            ResidualBlock(width, 2 * width, stride=2),
            ResidualBlock(2 * width, 4 * width, stride=2),
            ResidualBlock(4 * width, 8 * width, stride=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))
