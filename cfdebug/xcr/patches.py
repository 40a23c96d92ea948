"""The patch grid of paper B: an image of ``H×W`` pixels in square patches of side ``p``.

``d = (H/p)·(W/p)`` patches; the selector keeps ``k`` of them. Checked before any training, so a
patch size that does not divide the image, or a ``k`` beyond ``d``, is a message, not a crash.
"""

from __future__ import annotations

import numbers

from ..config import XCRConfig, check_int
from ..errors import CfdebugError

__all__ = ["num_patches", "check_k", "check_patch_grid"]


def num_patches(height: int, width: int, patch_size: int) -> int:
    """``d = (H/p)·(W/p)``; raises :class:`CfdebugError` when ``p`` does not divide ``H`` and ``W``."""
    check_int(patch_size, "patch_size", 1)
    if height % patch_size or width % patch_size:
        divisors = [p for p in range(1, min(height, width) + 1) if height % p == 0 and width % p == 0]
        shown = ", ".join(map(str, divisors[:12])) + (", …" if len(divisors) > 12 else "")
        raise CfdebugError(
            f"Expected `patch_size` to divide the image size {height}×{width}, but got {patch_size}. "
            f"Choose one of {shown}."
        )
    return (height // patch_size) * (width // patch_size)


def check_k(k, d: int) -> int:
    """Validate ``k`` against the number of patches ``d``; return it as an ``int``."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= d:
        raise CfdebugError(f"Expected `k` to be an integer in 1..{d} (the number of patches), but got {k!r}")
    return int(k)


def check_patch_grid(config: XCRConfig, image_size: int) -> int:
    """Validate ``config``'s patch size, ``k`` and Table 1 grid against ``image_size``; return ``d``."""
    d = num_patches(image_size, image_size, config.selector.patch_size)
    check_k(config.selector.k, d)
    for k in config.table1_grid()[0]:
        check_k(k, d)
    return d
