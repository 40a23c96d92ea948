"""The user's rectangle ("this region is not evidence") and what can be put in its place.

A region is ``(x0, y0, x1, y1)`` in the model's input pixels, ``x`` the column and ``y`` the row,
``x1``/``y1`` exclusive, as a box drawn on the image reads. Every function here works on
*normalised* batches ``[B, 3, S, S]`` (what the model sees), so the fills are expressed in the same
units: a colour or noise in ``[0, 1]`` RGB is normalised with the dataset's mean and std.

Fills (each carries no class information):

* ``colour``: one random colour per image (uniform RGB);
* ``noise``: uniform RGB noise per pixel;
* ``other-class``: the same rectangle taken from another image of the batch whose label differs
  (a random one; an image with no such partner gets a random colour).

Random draws come from the global torch RNG, which the training engine checkpoints, so a resumed
run draws the same fills.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import CfdebugError

#: The fills a region counterfactual can use; ``auto`` chooses among them on counterfactual validation.
FILLS = ("colour", "noise", "other-class")

__all__ = ["FILLS", "Region", "parse_region", "fill_region", "wrong_class_region", "hot_spot"]


@dataclass(frozen=True)
class Region:
    """A rectangle of input pixels: columns ``x0..x1-1``, rows ``y0..y1-1``."""

    x0: int
    y0: int
    x1: int
    y1: int

    @classmethod
    def of(cls, values: Sequence[int], size: int | None = None) -> "Region":
        """A validated region from four integers or a :class:`Region` (and, with ``size``, inside an
        image of that side)."""
        values = values.as_list() if isinstance(values, Region) else tuple(values)
        if len(values) != 4 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            raise CfdebugError(f"Expected a region as four integers X0,Y0,X1,Y1 (input pixels), but got {values!r}.")
        region = cls(*(int(v) for v in values))
        if not (0 <= region.x0 < region.x1 and 0 <= region.y0 < region.y1):
            raise CfdebugError(
                f"Expected a region with 0 <= X0 < X1 and 0 <= Y0 < Y1 (X1, Y1 exclusive), but got {region.text()}."
            )
        if size is not None and (region.x1 > size or region.y1 > size):
            raise CfdebugError(
                f"Expected the region inside the model's {size}×{size} input, but {region.text()} reaches "
                f"column {region.x1 - 1}, row {region.y1 - 1}. Give it in the model's input pixels (0..{size})."
            )
        return region

    def text(self) -> str:
        return f"{self.x0},{self.y0},{self.x1},{self.y1}"

    @property
    def rows(self) -> slice:
        return slice(self.y0, self.y1)

    @property
    def cols(self) -> slice:
        return slice(self.x0, self.x1)

    @property
    def area(self) -> int:
        return (self.x1 - self.x0) * (self.y1 - self.y0)

    def area_share(self, size: int) -> float:
        """The fraction of a ``size``×``size`` image the region covers."""
        return self.area / float(size * size)

    def as_list(self) -> list[int]:
        return [self.x0, self.y0, self.x1, self.y1]


def parse_region(text: str | Sequence[int] | None, size: int | None = None) -> Region | None:
    """``"X0,Y0,X1,Y1"`` (or four integers, or ``None``) as a :class:`Region`."""
    if text is None or text == "":
        return None
    if isinstance(text, str):
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            raise CfdebugError(f"Expected the region as X0,Y0,X1,Y1 (four integers, input pixels), but got {text!r}.") from None
        return Region.of(values, size)
    return Region.of(text, size)


def _normalised(rgb: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (rgb - mean.to(rgb.device)) / std.to(rgb.device)


def fill_region(images: torch.Tensor, labels: torch.Tensor, region: Region, fill: str, mean, std,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """A copy of ``images`` ``[B, 3, S, S]`` (normalised) with ``region`` replaced by ``fill``.

    ``labels`` ``[B]`` pair an image with a partner of another class for ``other-class``;
    ``mean``/``std`` ``[3, 1, 1]`` are the dataset's normalisation; ``generator`` (default: the
    global torch RNG) draws the colours, the noise and the partners.
    """
    if fill not in FILLS:
        raise CfdebugError(f"Expected `fill` to be one of {', '.join(FILLS)}, but got {fill!r}.")
    mean, std = torch.as_tensor(mean).view(3, 1, 1), torch.as_tensor(std).view(3, 1, 1)
    out = images.clone()
    b, h, w = len(images), region.y1 - region.y0, region.x1 - region.x0
    colour = _normalised(torch.rand((b, 3, 1, 1), generator=generator), mean, std).to(images.device)  # [B, 3, 1, 1]
    if fill == "colour":
        out[:, :, region.rows, region.cols] = colour.to(images.dtype)
    elif fill == "noise":
        noise = _normalised(torch.rand((b, 3, h, w), generator=generator), mean, std)
        out[:, :, region.rows, region.cols] = noise.to(images.device, images.dtype)
    else:
        partner = _partners(labels.cpu(), generator)  # [B], -1 where no image of another class
        patch = images[partner.clamp_min(0).to(images.device)][:, :, region.rows, region.cols]
        lonely = (partner < 0).to(images.device).view(-1, 1, 1, 1)
        out[:, :, region.rows, region.cols] = torch.where(lonely, colour.to(images.dtype).expand_as(patch), patch)
    return out


def _partners(labels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """For each item, a random other item with a different label (``-1`` when there is none)."""
    b = len(labels)
    scores = torch.rand((b, b), generator=generator)  # a random order of candidates per row
    allowed = labels.view(-1, 1) != labels.view(1, -1)  # [B, B]
    scores = torch.where(allowed, scores, torch.full_like(scores, -1.0))
    best = scores.argmax(1)
    return torch.where(allowed.any(1), best, torch.full_like(best, -1))


def wrong_class_region(images: torch.Tensor, labels: torch.Tensor, donors: torch.Tensor, donor_labels: torch.Tensor,
                       region: Region, seed: int) -> torch.Tensor:
    """A copy of ``images`` ``[N, 3, S, S]`` whose ``region`` shows a *wrong* class's content: the
    same rectangle of a donor image (``donors`` ``[M, 3, S, S]``, labels ``donor_labels`` [M]) of
    another class than the image's own ``labels`` [N], chosen with ``seed`` (reproducible).

    This is the artifact-sensitivity test set: a model that ignores the region scores on it as on
    the plain images; one that reads the region is pulled towards the donor's class.
    """
    generator = torch.Generator().manual_seed(int(seed))
    out = images.clone()
    donor_labels = donor_labels.cpu()
    for cls in labels.unique().tolist():
        rows = torch.nonzero(labels.cpu() == cls).view(-1)
        pool = torch.nonzero(donor_labels != cls).view(-1)
        if len(pool) == 0:
            continue  # a one-class donor set has nothing wrong to show
        pick = pool[torch.randint(len(pool), (len(rows),), generator=generator)]
        out[rows.to(images.device), :, region.y0 : region.y1, region.x0 : region.x1] = (
            donors[pick.to(donors.device)][:, :, region.rows, region.cols].to(images.device, images.dtype)
        )
    return out


def hot_spot(error_maps: np.ndarray, correct_maps: np.ndarray, side: int | None = None) -> Region | None:
    """The square the model looks at on its errors more than on its correct predictions: the
    ``side``×``side`` window (default a fifth of the image) with the largest summed difference of
    the mean Grad-CAM maps, errors ``[E, H, W]`` minus correct ``[M, H, W]`` (both in [0, 1]).

    A shortcut draws attention on the errors it causes; looking where the errors look *more*
    (not where they look most, which on a digit is the digit) proposes its place. ``None`` when no
    window has more attention on the errors (identical or flat maps: nothing to propose).
    """
    e, c = np.asarray(error_maps, np.float64), np.asarray(correct_maps, np.float64)
    if e.ndim != 3 or c.ndim != 3 or e.shape[1:] != c.shape[1:] or not len(e) or not len(c):
        raise CfdebugError(f"Expected error and correct maps of shape [n, H, W] with n >= 1, but got {e.shape} and {c.shape}.")
    h, w = e.shape[1:]
    side = max(1, min(h, w, int(round(min(h, w) / 5)) if side is None else int(side)))
    diff = e.mean(0) - c.mean(0)  # [H, W]
    total = np.pad(diff.cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # summed-area table
    sums = total[side:, side:] - total[:-side, side:] - total[side:, :-side] + total[:-side, :-side]  # [H-side+1, W-side+1]
    if not sums.max() > 1e-6 * max(float(np.abs(e).max()), float(np.abs(c).max()), 1e-12):
        return None  # the errors look nowhere more than the correct predictions (e.g. flat 1×1 maps)
    y, x = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return Region(int(x), int(y), int(x) + side, int(y) + side)
