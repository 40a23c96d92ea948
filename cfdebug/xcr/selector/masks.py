"""The selector's masks, pure functions on tensors: the Gumbel top-k training sample, the hard
top-k (and softmax) evaluation maps, ``T(x)`` (a mask upsampled onto the image) and random
k-hot masks for paper B's random comparison."""

from __future__ import annotations

import numpy as np
import torch

from ...config import SELECTOR_MODES as MODES
from ...config import SelectorConfig, check_int
from ...errors import CfdebugError
from ..patches import check_k, num_patches


def topk_mask(log_p: torch.Tensor, k: int) -> torch.Tensor:
    """Hard evaluation mask: ``[B, d]`` float 0/1 with exactly ``k`` ones per row.

    ``torch.topk`` returns exactly ``k`` indices even with ties, so the count is exact.
    """
    check_k(k, log_p.shape[1])
    index = log_p.topk(k, dim=1).indices  # [B, k]
    return torch.zeros_like(log_p).scatter_(1, index, 1.0)


def relaxed_mask(log_p: torch.Tensor, k: int, tau: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training sample ``z* = max_l softmax((g^(l) + log p)/τ)``, ``l = 1..k`` (paper B eq. 3–4).

    Args:
        log_p: ``[B, d]`` float log-probabilities of the patches (rows log-sum-exp to 0).
        k: number of independent Gumbel draws, 1..d.
        tau: temperature (> 0); lower is closer to a hard k-hot sample.
        generator: optional torch generator on ``log_p``'s device for the uniform noise.

    Returns:
        ``[B, d]`` float in ``[0, 1]``, differentiable with respect to ``log_p``.
    """
    b, d = log_p.shape
    check_k(k, d)
    # All k draws at once ([B, k, d]), not a Python loop: one kernel per op on the device.
    u = torch.rand((b, k, d), device=log_p.device, dtype=log_p.dtype, generator=generator)
    # Keep u away from 0 and 1 so the double log stays finite.
    tiny = torch.finfo(log_p.dtype).tiny
    u = u.clamp(min=tiny, max=1.0 - torch.finfo(log_p.dtype).eps)
    gumbel = -torch.log(-torch.log(u))
    c = torch.softmax((gumbel + log_p.unsqueeze(1)) / tau, dim=-1)  # [B, k, d]
    return c.max(dim=1).values  # [B, d]


def training_mask(log_p: torch.Tensor, config: SelectorConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """The mask ``T(x)`` uses while training: ``[B, d]`` float, differentiable in ``log_p``.

    ``config.estimator == "relaxed"``: the relaxed sample :func:`relaxed_mask` itself (paper B).
    ``"straight-through"``: its ``k`` largest entries as a hard k-hot mask in the forward pass,
    the relaxed sample's gradient in the backward pass. The relaxed sample draws its ``k``
    patches with replacement, so once ``p`` is peaked it keeps far fewer than ``k`` (about 12
    of 32 on Hard Digits) and the approximator, trained on those, meets ``k`` patches only at
    evaluation; the straight-through mask shows it exactly ``k`` while training too.
    """
    z = relaxed_mask(log_p, config.k, config.tau, generator)
    if config.estimator == "relaxed":
        return z
    return topk_mask(z.detach(), config.k) - z.detach() + z


def selection_map(log_p: torch.Tensor, k: int, mode: str = "Topk") -> torch.Tensor:
    """The evaluation mask for a selection ``mode``: ``[B, d]`` float.

    ``"Topk"``: the hard k-hot map (exactly ``k`` ones). ``"Softmax"``: the softmax map
    ``p(x)`` itself (values in ``[0, 1]``, each row sums to 1), as METHODS.md specifies.
    """
    if mode == "Topk":
        return topk_mask(log_p, k)
    if mode == "Softmax":
        return log_p.exp()
    raise CfdebugError(f"Expected `mode` to be one of {', '.join(MODES)}, but got {mode!r}")


def apply_mask(x: torch.Tensor, mask, patch_size: int) -> torch.Tensor:
    """``T(x) = nearest-upsample(mask) ⊙ x``: keep (or weight) patches, zero the rest.

    Args:
        x: ``[B, C, H, W]`` float, normalised images (0 is the dataset mean, so a dropped
            patch becomes the mean colour).
        mask: ``[B, d]`` bool or float (0/1 or soft weights), ``d = (H/p)·(W/p)``, patches
            in row-major order over the ``(H/p) × (W/p)`` grid; a tensor or a NumPy array.
        patch_size: ``p``; must divide ``H`` and ``W``.

    Returns:
        A new ``[B, C, H, W]`` tensor with ``x``'s dtype and device; inputs are not modified.
    """
    if x.ndim != 4:
        raise CfdebugError(f"Expected `x` to have shape [B, C, H, W], but got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    d = num_patches(h, w, patch_size)
    mask = torch.as_tensor(mask, device=x.device)
    if mask.shape != (b, d):
        raise CfdebugError(
            f"Expected `mask` to have shape [B, d] = [{b}, {d}] for {h}×{w} images and patch size "
            f"{patch_size}, but got shape {tuple(mask.shape)}"
        )
    grid = mask.to(x.dtype).reshape(b, 1, h // patch_size, w // patch_size)  # [B, d] → [B, 1, H/p, W/p]
    # Nearest upsampling by an integer factor is a repeat; repeat_interleave keeps autograd intact.
    up = grid.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)  # [B, 1, H, W]
    return x * up


def random_masks(n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    """Random k-hot masks (paper B's "Compare with Random"): ``[n, d]`` bool, exactly ``k`` per row.

    Reproducible: the same ``(n, d, k, seed)`` gives the same masks (NumPy ``default_rng``).
    """
    check_int(n, "n", 0)
    check_int(d, "d", 1)
    k = check_k(k, d)
    rng = np.random.default_rng(seed)
    # The k smallest of d i.i.d. uniforms are a uniformly random k-subset.
    index = np.argpartition(rng.random((n, d)), k - 1, axis=1)[:, :k]  # [n, k]
    masks = np.zeros((n, d), dtype=bool)
    np.put_along_axis(masks, index, True, axis=1)
    return masks
