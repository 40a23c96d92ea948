"""The 15 common corruptions of Hendrycks & Dietterich (ICLR 2019) with the CIFAR-10-C parameters.

The severity tables are those of ``make_cifar_c.py`` in ``hendrycks/robustness`` (the CIFAR
values, which are milder than the ImageNet-C ones), re-implemented on numpy, scipy, Pillow and
OpenCV so that nothing is downloaded at run time and nothing depends on scikit-image or Wand
(ImageMagick). Where the original could not be followed exactly, the function says so:

- ``frost`` blends with a procedural, seeded ice texture instead of the six frost photographs;
- ``motion_blur`` and ``snow`` build ImageMagick's one-sided Gaussian motion kernel themselves
  and apply it with ``cv2.filter2D``;
- ``glass_blur`` is vectorised; it reproduces what the original loop actually computes (see
  :func:`_glass_shuffle`).

Random draws come from ``np.random.default_rng(seed)`` only, so a call is reproducible and the
global NumPy RNG is never touched. Results equal the official CIFAR-10-C files in distribution,
not pixel for pixel (those were made with the global RNG of 2018); the official files can be
loaded with :func:`cfdebug.data.formats.load_cifar10c`.
"""

from __future__ import annotations

import difflib
import io
import math
import numbers

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage

from ..config import CORRUPTION_GROUPS, CORRUPTIONS, N_SEVERITIES
from ..errors import CfdebugError

__all__ = ["CORRUPTIONS", "CORRUPTION_GROUPS", "MIN_IMAGE_SIZE", "corrupt", "check_corruption_name", "check_severity"]


# The smallest side every corruption handles sensibly: glass blur never moves the top two rows
# or left two columns, elastic's affine anchors sit a third of the side from the centre, and
# pixelate at severity 5 keeps 65 % of the side; below 8 px these degenerate to (nearly) nothing.
MIN_IMAGE_SIZE = 8

# /////////////// Severity tables (make_cifar_c.py, CIFAR-10 values) ///////////////

_GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)  # std on [0, 1] intensities
_SHOT_NOISE = (500, 250, 100, 75, 50)  # photons per unit intensity
_IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)  # fraction of values set to 0 or 1
_DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))  # disk radius, alias blur
# sigma, max_delta, iterations
_GLASS_BLUR = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))
_MOTION_BLUR = ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))  # ImageMagick radius, sigma
_ZOOM_BLUR = tuple(
    # np.arange with a float step, as in the original, so each severity averages the same
    # number of zooms (7, 12, 16, 21, 26 including the upper end from float round-off).
    np.arange(1, stop, 0.01)
    for stop in (1.06, 1.11, 1.16, 1.21, 1.26)
)
# loc, scale, zoom, threshold, blur radius, blur sigma, mix
_SNOW = (
    (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
    (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
    (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
    (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
    (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
)
_FROST = ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))  # image weight, frost weight
_FOG = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))  # fog strength, wibble decay
_BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)  # added to HSV value
_CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)  # factor on the deviation from the channel mean
# alpha, sigma, affine jitter, as fractions of the side (the original multiplies by IMSIZE=32)
_ELASTIC = ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))
_PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)  # downscale factor
_JPEG = (80, 65, 58, 50, 40)  # Pillow quality


# /////////////// Validation ///////////////


def check_corruption_name(name, valid: tuple[str, ...] = CORRUPTIONS) -> str:
    """``name`` if it is one of ``valid``; else a :class:`CfdebugError` listing them (and the closest)."""
    if not isinstance(name, str) or name not in valid:
        close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise CfdebugError(
            f"Expected `name` to be one of {', '.join(valid)}, but got {name!r}.{hint} "
            "Pass one of the listed corruption names."
        )
    return name


def _show(value) -> str:
    """``value`` as a user would have typed it (``7``, not ``np.int64(7)``)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    return repr(value)


def check_severity(severity) -> int:
    """``severity`` as an ``int`` in ``1..5``; else a :class:`CfdebugError`."""
    ok = isinstance(severity, numbers.Integral) and not isinstance(severity, bool)
    if not ok or not 1 <= int(severity) <= N_SEVERITIES:
        raise CfdebugError(
            f"Expected `severity` to be an integer in 1..{N_SEVERITIES}, but got {_show(severity)}. "
            "Pass 1 for the mildest and 5 for the strongest corruption."
        )
    return int(severity)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise CfdebugError(
            f"Expected `seed` to be a non-negative integer, but got {_show(seed)}. Pass e.g. seed=0."
        )
    return int(seed)


def _check_images(images) -> np.ndarray:
    """Return ``images`` as a ``[N, H, W, 3]`` uint8 view (no copy) or raise."""
    if not isinstance(images, np.ndarray):
        raise CfdebugError(
            "Expected `images` to be a numpy array of shape [N, H, W, 3] or [H, W, 3], "
            f"but got {type(images).__name__}. Convert it with np.asarray(images, dtype=np.uint8)."
        )
    if images.dtype != np.uint8:
        raise CfdebugError(
            f"Expected `images` to have dtype uint8 (values 0..255), but got {images.dtype}. "
            "Convert float images in [0, 1] with (x * 255).round().astype(np.uint8)."
        )
    if images.ndim not in (3, 4) or images.shape[-1] != 3:
        raise CfdebugError(
            "Expected `images` to have shape [N, H, W, 3] or [H, W, 3] (channels last, RGB), "
            f"but got {list(images.shape)}. Transpose [N, 3, H, W] arrays with "
            "x.transpose(0, 2, 3, 1); repeat grey images to 3 channels."
        )
    batch = images if images.ndim == 4 else images[None]
    h, w = batch.shape[1:3]
    if min(h, w) < MIN_IMAGE_SIZE:
        raise CfdebugError(
            f"Expected `images` to be at least {MIN_IMAGE_SIZE}×{MIN_IMAGE_SIZE} pixels, "
            f"but got {h}×{w}. Upsample them first (e.g. to 32×32, the CIFAR size)."
        )
    return batch


# /////////////// Helpers ///////////////


def _gaussian(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """Blur the spatial axes of ``[N, H, W, C]`` or ``[N, H, W]`` floats like skimage's ``gaussian``."""
    sigmas = (0, sigma, sigma, 0)[: x.ndim]
    return ndimage.gaussian_filter(x, sigma=sigmas, mode=mode, truncate=truncate)


def _linear_zoom_matrix(n_in: int, factor: float, n_keep: int) -> np.ndarray:
    """``[n_keep, n_in]`` matrix doing scipy's order-1 ``zoom`` along one axis, centre rows only.

    ``scipy.ndimage.zoom(order=1)`` (``grid_mode=False``) outputs ``round(n_in·factor)`` samples
    at input coordinates ``i·(n_in-1)/(n_out-1)``, interpolated linearly; the original then keeps
    the centre ``n_keep``. Bilinear interpolation is separable, so two such matrices reproduce
    it, for a whole batch at once and much faster than ``zoom`` on a 4-D array.
    """
    n_out = int(round(n_in * factor))
    trim = (n_out - n_keep) // 2
    step = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    coords = np.arange(trim, trim + n_keep) * step
    lower = np.minimum(np.floor(coords).astype(int), n_in - 1)
    upper = np.minimum(lower + 1, n_in - 1)
    frac = coords - lower
    matrix = np.zeros((n_keep, n_in))
    rows = np.arange(n_keep)
    np.add.at(matrix, (rows, lower), 1 - frac)
    np.add.at(matrix, (rows, upper), frac)
    return matrix


def _clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom ``[N, H, W, C]`` into its centre by ``factor`` ≥ 1, keeping ``H×W`` (bilinear)."""
    h, w = x.shape[1:3]
    # ceil so the zoomed crop is never smaller than the output
    ch, cw = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[:, top : top + ch, left : left + cw]
    zoom_h = _linear_zoom_matrix(ch, factor, h).astype(x.dtype)
    zoom_w = _linear_zoom_matrix(cw, factor, w).astype(x.dtype)
    return np.einsum("ik,nklc,jl->nijc", zoom_h, crop, zoom_w, optimize=True)


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    """Anti-aliased disk kernel ``[K, K]`` float32 summing to 1 (the original's ``disk``)."""
    if radius <= 8:
        half, ksize = 8, (3, 3)
    else:
        half, ksize = int(radius), (5, 5)
    coords = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(coords, coords)
    kernel = (xx**2 + yy**2 <= radius**2).astype(np.float32)
    kernel /= kernel.sum()
    return cv2.GaussianBlur(kernel, ksize=ksize, sigmaX=alias_blur)


def _motion_kernel(radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick's ``-motion-blur radius x sigma + angle`` as a ``[K, K]`` float32 correlation kernel.

    ImageMagick averages each pixel with the pixels *behind* it along ``angle`` (a one-sided
    line), weighted by a half Gaussian of ``sigma`` and ``2·ceil(radius)+1`` taps long; the tap
    offsets are rounded to whole pixels. ``cv2.filter2D`` correlates, so a weight at
    ``(centre + dy, centre + dx)`` reads the source at ``(y + dy, x + dx)``, as ImageMagick does.
    """
    width = int(2 * math.ceil(radius) + 1)
    taps = np.arange(width, dtype=np.float64)
    weights = np.exp(-(taps**2) / (2.0 * sigma**2))
    weights /= weights.sum()
    theta = math.radians(angle)
    # ceil(v - 0.5) is ImageMagick's rounding of the tap offsets
    dx = np.ceil(taps * math.cos(theta) - 0.5).astype(int)
    dy = np.ceil(taps * math.sin(theta) - 0.5).astype(int)
    centre = width - 1
    kernel = np.zeros((2 * width - 1, 2 * width - 1), dtype=np.float64)
    np.add.at(kernel, (centre + dy, centre + dx), weights)
    return kernel.astype(np.float32)


def _motion_blur_one(image: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """Motion-blur one ``[H, W]`` or ``[H, W, C]`` float32 image; edges repeat (ImageMagick's default)."""
    kernel = _motion_kernel(radius, sigma, angle)
    return cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REPLICATE)


def _plasma_fractal(rng: np.random.Generator, n: int, mapsize: int, wibbledecay: float) -> np.ndarray:
    """``n`` diamond-square height maps ``[n, mapsize, mapsize]`` float64 in [0, 1].

    ``mapsize`` must be a power of two.

    Follows the original (itself after FLHerne/mapgen), including its perturbation of
    ``wibble · U(-wibble, wibble)``, i.e. an amplitude that decays by ``wibbledecay²`` per level:
    that quirk sets how patchy the fog looks, so it is kept.
    """
    maps = np.zeros((n, mapsize, mapsize), dtype=np.float64)
    stepsize = mapsize
    wibble = 100.0

    def wibbled_mean(total: np.ndarray) -> np.ndarray:
        return total / 4 + wibble * rng.uniform(-wibble, wibble, size=total.shape)

    while stepsize >= 2:
        half = stepsize // 2
        # squares: centre of each square of corners gets the corners' mean plus noise
        corners = maps[:, 0::stepsize, 0::stepsize]
        square_sum = corners + np.roll(corners, -1, axis=1)
        square_sum = square_sum + np.roll(square_sum, -1, axis=2)
        maps[:, half::stepsize, half::stepsize] = wibbled_mean(square_sum)
        # diamonds: edge midpoints get the mean of the two corners and two centres around them
        centres = maps[:, half::stepsize, half::stepsize]
        corners = maps[:, 0::stepsize, 0::stepsize]
        left_total = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
        maps[:, 0::stepsize, half::stepsize] = wibbled_mean(left_total)
        top_total = centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
        maps[:, half::stepsize, 0::stepsize] = wibbled_mean(top_total)
        stepsize //= 2
        wibble /= wibbledecay

    maps -= maps.min(axis=(1, 2), keepdims=True)
    return maps / maps.max(axis=(1, 2), keepdims=True)


def _frost_texture(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """``n`` procedural frost layers ``[n, h, w, 3]`` float64 in [0, 255], bright bluish white.

    Stands in for the frost photographs of the original: a cloudy diamond-square base (rime)
    plus ice needles grown from sparse random seeds along the three directions of hexagonal
    ice (0°, 60°, 120°), at two scales, slightly blurred. Rendered at 2× and downsampled with
    area averaging, much as the original shrinks its photos to a fifth before cropping.
    """
    scale = 2
    big_h, big_w = h * scale, w * scale
    mapsize = 1 << (max(big_h, big_w) - 1).bit_length()  # next power of two ≥ the longer side
    rime = _plasma_fractal(rng, n, mapsize, 2.0)[:, :big_h, :big_w]

    needles = np.zeros((n, big_h, big_w))
    # (seed density, needle length in px at 2x) — a few long needles and many short ones
    for density, length in ((0.002, 21), (0.008, 7)):
        seeds = (rng.random((n, big_h, big_w)) < density) * rng.uniform(0.4, 1.0, size=(n, big_h, big_w))
        base_angle = rng.uniform(0, 60)  # one crystal orientation per call, as in a real pane
        grown = np.zeros_like(needles)
        for k in range(3):
            theta = math.radians(base_angle + 60 * k)
            half = length // 2
            kernel = np.zeros((2 * half + 1, 2 * half + 1))
            for t in np.linspace(-half, half, 4 * half + 1):
                kernel[
                    int(round(half + t * math.sin(theta))), int(round(half + t * math.cos(theta)))
                ] = 1.0
            grown = np.maximum(grown, ndimage.correlate(seeds, kernel[None], mode="wrap"))
        needles += grown
    needles = ndimage.gaussian_filter(np.clip(needles, 0, 1), sigma=(0, 0.6, 0.6), mode="wrap")

    value = np.clip(0.25 + 0.4 * rime + 0.7 * needles, 0, 1)  # [n, 2h, 2w]
    value = value.reshape(n, h, scale, w, scale).mean(axis=(2, 4))
    tint = np.array([0.84, 0.92, 1.0])  # icy: blue strongest, red weakest
    return 255.0 * value[..., None] * tint


# /////////////// Corruptions: [N, H, W, 3] uint8 in, [N, H, W, 3] float in [0, 255] out ///////////////


def _gaussian_noise(x, severity, rng):
    c = _GAUSSIAN_NOISE[severity - 1]
    x = x / 255.0
    return np.clip(x + rng.normal(scale=c, size=x.shape), 0, 1) * 255


def _shot_noise(x, severity, rng):
    c = _SHOT_NOISE[severity - 1]
    x = x / 255.0
    return np.clip(rng.poisson(x * c) / c, 0, 1) * 255


def _impulse_noise(x, severity, rng):
    # skimage's random_noise(mode="s&p", amount=c): each value (per channel) is hit with
    # probability c and then set to 0 or 1 with equal odds.
    c = _IMPULSE_NOISE[severity - 1]
    x = x / 255.0
    hit = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    x[hit & salt] = 1.0
    x[hit & ~salt] = 0.0
    return x * 255


def _defocus_blur(x, severity, rng):
    radius, alias_blur = _DEFOCUS_BLUR[severity - 1]
    kernel = _disk(radius, alias_blur)
    x = x.astype(np.float32) / 255.0
    out = np.stack([cv2.filter2D(image, -1, kernel) for image in x])
    return np.clip(out, 0, 1) * 255


def _glass_shuffle(x: np.ndarray, dy: np.ndarray, dx: np.ndarray, max_delta: int) -> np.ndarray:
    """One pass of glass blur's local pixel shuffle on ``[N, H, W, C]``, returning a new array.

    ``dy, dx``: ``[N, H - 2·max_delta, W - 2·max_delta]`` integer offsets in
    ``[-max_delta, max_delta - 1]`` for the pixels ``max_delta+1 .. H-max_delta`` (and likewise
    columns), i.e. the original's ``range(H - d, d, -1)``.

    The original runs ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` walking from the bottom-right
    corner to the top-left. On NumPy pixel rows that statement is not a swap: the right-hand
    side holds *views*, so it copies ``x[h', w']`` into ``x[h, w]`` and writes that back over
    ``x[h', w']`` unchanged. For ``max_delta = 1`` (the only CIFAR value) the offsets point up
    or left, which the walk has not reached yet, so the pass equals the parallel gather
    ``x[h, w] ← x[h + dy, w + dx]`` done here. That is what the CIFAR-10-C files contain.
    """
    n, h, w = x.shape[:3]
    rows = np.arange(max_delta + 1, h - max_delta + 1)
    cols = np.arange(max_delta + 1, w - max_delta + 1)
    batch = np.arange(n)[:, None, None]
    out = x.copy()
    # [n, rows, cols, C]
    out[:, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = x[
        batch, rows[None, :, None] + dy, cols[None, None, :] + dx
    ]
    return out


def _glass_blur(x, severity, rng):
    sigma, max_delta, iterations = _GLASS_BLUR[severity - 1]
    n, h, w, _ = x.shape
    # truncation to uint8 as in the original (np.uint8 of a float array)
    x = (_gaussian(x / 255.0, sigma) * 255).astype(np.uint8)
    shape = (n, h - 2 * max_delta, w - 2 * max_delta)
    for _ in range(iterations):
        # the original's randint(-d, d) excludes d
        dy = rng.integers(-max_delta, max_delta, size=shape)
        dx = rng.integers(-max_delta, max_delta, size=shape)
        x = _glass_shuffle(x, dy, dx, max_delta)
    return np.clip(_gaussian(x / 255.0, sigma), 0, 1) * 255


def _motion_blur(x, severity, rng):
    radius, sigma = _MOTION_BLUR[severity - 1]
    angles = rng.uniform(-45, 45, size=len(x))
    x = x.astype(np.float32)
    return np.stack([_motion_blur_one(image, radius, sigma, a) for image, a in zip(x, angles)])


def _zoom_blur(x, severity, rng):
    factors = _ZOOM_BLUR[severity - 1]
    x = (x / 255.0).astype(np.float32)
    out = np.zeros_like(x)
    for factor in factors:
        out += _clipped_zoom(x, factor)
    return np.clip((x + out) / (len(factors) + 1), 0, 1) * 255


def _snow(x, severity, rng):
    loc, scale, zoom, threshold, radius, sigma, mix = _SNOW[severity - 1]
    n, h, w, _ = x.shape
    x = x.astype(np.float32) / 255.0
    flakes = rng.normal(loc=loc, scale=scale, size=(n, h, w, 1))
    flakes = _clipped_zoom(flakes, zoom)[..., 0]
    flakes[flakes < threshold] = 0
    # the original hands ImageMagick an 8-bit PNG, so the layer is quantised before the blur
    flakes = (np.clip(flakes, 0, 1) * 255).astype(np.uint8).astype(np.float32) / 255.0
    angles = rng.uniform(-135, -45, size=n)
    flakes = np.stack([_motion_blur_one(f, radius, sigma, a) for f, a in zip(flakes, angles)])
    flakes = flakes[..., None]  # [n, h, w, 1]
    grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # cv2's RGB2GRAY weights
    x = mix * x + (1 - mix) * np.maximum(x, grey[..., None] * 1.5 + 0.5)
    # the flakes are added twice, the second time rotated by 180°
    return np.clip(x + flakes + flakes[:, ::-1, ::-1], 0, 1) * 255


def _frost(x, severity, rng):
    """Blend with a procedural ice texture (no frost photographs ship with cfdebug).

    The mixing weights are CIFAR-10-C's; the texture is :func:`_frost_texture`, one per image,
    so the result resembles the original in strength, not in the look of real frost.
    """
    image_weight, frost_weight = _FROST[severity - 1]
    n, h, w, _ = x.shape
    frost = _frost_texture(rng, n, h, w)
    return np.clip(image_weight * x.astype(np.float64) + frost_weight * frost, 0, 255)


def _fog(x, severity, rng):
    strength, decay = _FOG[severity - 1]
    n, h, w, _ = x.shape
    mapsize = 1 << (max(h, w) - 1).bit_length()  # next power of two ≥ the longer side
    x = x / 255.0
    max_val = x.max(axis=(1, 2, 3), keepdims=True)
    x = x + strength * _plasma_fractal(rng, n, mapsize, decay)[:, :h, :w, None]
    return np.clip(x * max_val / (max_val + strength), 0, 1) * 255


def _brightness(x, severity, rng):
    # Raising HSV's V with H and S fixed scales all three channels by V'/V (V = max channel);
    # black pixels (V = 0, S = 0 by convention) become grey V'. Exactly skimage's round trip.
    c = _BRIGHTNESS[severity - 1]
    x = x / 255.0
    value = x.max(axis=-1, keepdims=True)
    new_value = np.clip(value + c, 0, 1)
    ratio = np.divide(new_value, value, out=np.zeros_like(value), where=value > 0)
    out = np.where(value > 0, x * ratio, new_value)
    return np.clip(out, 0, 1) * 255


def _contrast(x, severity, rng):
    c = _CONTRAST[severity - 1]
    x = x / 255.0
    means = x.mean(axis=(1, 2), keepdims=True)  # per image and channel
    return np.clip((x - means) * c + means, 0, 1) * 255


def _elastic_transform(x, severity, rng):
    n, h, w, _ = x.shape
    alpha_f, sigma_f, jitter_f = _ELASTIC[severity - 1]
    # The original scales by IMSIZE = 32; the side length generalises that to other sizes.
    side = min(h, w)
    alpha, sigma, jitter = alpha_f * side, sigma_f * side, jitter_f * side
    x = x.astype(np.float32) / 255.0

    # random affine: move three anchor points around the centre by up to `jitter` px
    centre = np.float32([h, w]) // 2
    size = side // 3
    anchors = np.float32([centre + size, [centre[0] + size, centre[1] - size], centre - size])
    warped = np.empty_like(x)
    for i in range(n):
        moved = anchors + rng.uniform(-jitter, jitter, size=anchors.shape).astype(np.float32)
        matrix = cv2.getAffineTransform(anchors, moved)
        warped[i] = cv2.warpAffine(x[i], matrix, (w, h), borderMode=cv2.BORDER_REFLECT_101)

    # smooth random displacement field, `alpha` px at most
    dx = _gaussian(rng.uniform(-1, 1, size=(n, h, w)), sigma, mode="reflect", truncate=3) * alpha
    dy = _gaussian(rng.uniform(-1, 1, size=(n, h, w)), sigma, mode="reflect", truncate=3) * alpha
    dx = dx.astype(np.float32)[..., None]  # [n, h, w, 1]
    dy = dy.astype(np.float32)[..., None]
    bb, yy, xx, cc = np.meshgrid(np.arange(n), np.arange(h), np.arange(w), np.arange(3), indexing="ij")
    # Batch and channel coordinates are whole numbers, so bilinear sampling over the 4-D array
    # equals the original's per-image 3-D sampling.
    coords = np.stack([bb, yy + dy, xx + dx, cc]).reshape(4, -1)
    out = ndimage.map_coordinates(warped, coords, order=1, mode="reflect").reshape(x.shape)
    return np.clip(out, 0, 1) * 255


def _pixelate(x, severity, rng):
    c = _PIXELATE[severity - 1]
    _, h, w, _ = x.shape
    small = (int(w * c), int(h * c))
    box = Image.Resampling.BOX
    return np.stack(
        [np.asarray(Image.fromarray(image).resize(small, box).resize((w, h), box)) for image in x]
    )


def _jpeg_compression(x, severity, rng):
    quality = _JPEG[severity - 1]
    out = []
    for image in x:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            out.append(np.asarray(decoded.convert("RGB")))
    return np.stack(out)


_FUNCTIONS = {name: globals()[f"_{name}"] for name in CORRUPTIONS}


# /////////////// Public API ///////////////


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Apply one CIFAR-10-C corruption at one severity.

    Args:
        images: ``[N, H, W, 3]`` or ``[H, W, 3]`` uint8 RGB in [0, 255], ``H, W ≥ 8``
            (the CIFAR parameters are tuned for 32×32). Not modified.
        name: one of :data:`CORRUPTIONS`.
        severity: integer in 1..5 (5 is the strongest).
        seed: non-negative integer; the same images, name, severity and seed give the same
            output. Draws come from ``np.random.default_rng(seed)``, never the global RNG.

    Returns:
        A new array of the same shape, uint8 in [0, 255]. Floats are truncated to uint8, as
        ``np.uint8(...)`` does in ``make_cifar_c.py``.

    Raises:
        CfdebugError: for an unknown name, a severity outside 1..5, a bad seed, or images that
            are not uint8 ``[N, H, W, 3]`` / ``[H, W, 3]`` of at least 8×8 pixels.
    """
    name = check_corruption_name(name, CORRUPTIONS)
    severity = check_severity(severity)
    seed = _check_seed(seed)
    batch = _check_images(images)
    if len(batch) == 0:
        return images.copy()
    rng = np.random.default_rng(seed)
    # every corruption function builds new arrays from `batch` (never writes into it)
    out = _FUNCTIONS[name](batch, severity, rng)
    out = np.clip(out, 0, 255).astype(np.uint8)
    return out if images.ndim == 4 else out[0]
