"""Tests for cfdebug.data.corruptions: the 15 CIFAR-10-C corruptions and the CIFAR-10-C loader."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
from scipy import ndimage

from cfdebug.data import corruptions as C
from cfdebug.data.corruptions import CORRUPTION_GROUPS, CORRUPTIONS, corrupt
from cfdebug.errors import CfdebugError

# Corruptions without random draws: the seed cannot change them.
DETERMINISTIC = {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression"}
# Corruptions whose PSNR falls at every step of severity with the CIFAR-10-C tables. The others
# are not monotone in the original either: glass_blur varies sigma and iterations
# non-monotonically, motion_blur's severities 3 and 4 differ only in kernel taps of weight ~1e-8,
# pixelate's 28 px vs 27 px box resizes alias differently, frost darkens the image while adding
# ice, and elastic_transform is tested separately (see test_elastic_local_warp_grows).
MONOTONE = {
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "zoom_blur", "snow", "fog",
    "brightness", "contrast", "jpeg_compression",
}


def _make_images(n: int = 6, h: int = 32, w: int = 32) -> np.ndarray:
    """``[n, h, w, 3]`` uint8: smooth colour gradients with a disc and a rectangle, no noise."""
    yy, xx = np.mgrid[0:h, 0:w]
    images = []
    for i in range(n):
        img = np.zeros((h, w, 3))
        img[..., 0] = 30 + 180 * xx / (w - 1)
        img[..., 1] = 50 + 150 * ((yy + 4 * i) % h) / (h - 1)
        img[..., 2] = 200 - 120 * (xx + yy) / (h + w - 2)
        cy, cx = h // 4 + 2 * i, 2 * w // 3 - i
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < (h / 6) ** 2 + 5 * i] = [230, 200 - 20 * i, 40]
        img[h // 2 + 2 + i % 3 : h - 4, 3 + i : w // 2 - 2 + i] = [20 + 20 * i, 40, 150]
        images.append(img)
    return np.stack(images).round().astype(np.uint8)


def _psnr(clean: np.ndarray, noisy: np.ndarray) -> float:
    """Mean over the batch of the PSNR in dB of ``[N, H, W, 3]`` uint8 images."""
    mse = ((clean.astype(np.float64) - noisy.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return _make_images()


def test_registry():
    assert len(CORRUPTIONS) == 15
    assert CORRUPTIONS[:3] == ("gaussian_noise", "shot_noise", "impulse_noise")
    assert CORRUPTIONS[-1] == "jpeg_compression"
    assert tuple(CORRUPTION_GROUPS) == ("noise", "blur", "weather", "digital")
    assert sum(CORRUPTION_GROUPS.values(), ()) == CORRUPTIONS


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_output_contract(name, images):
    before = images.copy()
    state = np.random.get_state()
    for severity in (1, 5):
        out = corrupt(images, name, severity, seed=3)
        assert out.shape == images.shape and out.dtype == np.uint8
        assert out is not images and not np.shares_memory(out, images)
        assert not np.array_equal(out, images), f"{name} at severity {severity} changed nothing"
        np.testing.assert_array_equal(out, corrupt(images, name, severity, seed=3))
        if name not in DETERMINISTIC:
            assert not np.array_equal(out, corrupt(images, name, severity, seed=4))
    np.testing.assert_array_equal(images, before)  # input not mutated
    after = np.random.get_state()
    assert after[0] == state[0] and np.array_equal(after[1], state[1]) and after[2:] == state[2:]

    single = corrupt(images[0], name, 3, seed=0)
    assert single.shape == images.shape[1:] and single.dtype == np.uint8


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_other_sizes(name):
    # non-square and minimum-size images must work, not only CIFAR's 32×32
    for h, w in ((12, 20), (C.MIN_IMAGE_SIZE, C.MIN_IMAGE_SIZE)):
        images = _make_images(2, h, w)
        out = corrupt(images, name, 5, seed=1)
        assert out.shape == images.shape and out.dtype == np.uint8


@pytest.mark.parametrize("name", [n for n in CORRUPTIONS if n != "elastic_transform"])
def test_stronger_with_severity(name, images):
    psnr = [_psnr(images, corrupt(images, name, s, seed=0)) for s in range(1, 6)]
    assert psnr[4] < psnr[0], f"{name}: PSNR by severity {psnr}"
    if name in MONOTONE:
        assert all(np.diff(psnr) < 0), f"{name}: PSNR by severity {psnr}"


def test_elastic_local_warp_grows():
    """CIFAR-10-C's elastic severity 1 is a pure affine jitter of up to 2.56 px (alpha = 0), so
    its PSNR is *lower* than at severity 5; what grows with severity is the local, non-affine
    displacement. Read it off an image whose colours encode their own coordinates."""
    size = 32
    yy, xx = np.mgrid[0:size, 0:size]
    ramp = np.stack([xx * 8, yy * 8, np.full_like(xx, 128)], axis=-1).astype(np.uint8)[None]
    inner = (slice(6, size - 6), slice(6, size - 6))  # away from reflected borders

    def non_affine_rms(severity: int) -> float:
        residuals = []
        for seed in range(4):
            out = corrupt(ramp, "elastic_transform", severity, seed=seed)[0].astype(np.float64)
            src = np.stack([out[..., 0][inner] / 8, out[..., 1][inner] / 8], -1).reshape(-1, 2)
            dst = np.stack([xx[inner], yy[inner], np.ones_like(xx[inner])], -1).reshape(-1, 3)
            coef, *_ = np.linalg.lstsq(dst, src, rcond=None)
            residuals.append(np.sqrt(np.mean((dst @ coef - src) ** 2)))
        return float(np.mean(residuals))

    rms = [non_affine_rms(s) for s in (1, 3, 5)]
    assert rms[0] < 0.1  # only quantisation of the uint8 ramp
    assert rms[0] < rms[1] < rms[2]


def test_glass_shuffle_matches_original_loop():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(2, 10, 12, 3), dtype=np.uint8)
    dy = rng.integers(-1, 1, size=(2, 8, 10))
    dx = rng.integers(-1, 1, size=(2, 8, 10))
    expected = x.copy()
    for n in range(2):
        img = expected[n]
        for h in range(10 - 1, 1, -1):
            for w in range(12 - 1, 1, -1):
                hp, wp = h + dy[n, h - 2, w - 2], w + dx[n, h - 2, w - 2]
                img[h, w], img[hp, wp] = img[hp, wp], img[h, w]  # the original's statement
    np.testing.assert_array_equal(C._glass_shuffle(x, dy, dx, 1), expected)


def test_brightness_matches_hsv_round_trip():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(1, 8, 8, 3), dtype=np.uint8)
    x[0, 0, 0] = 0  # a black pixel: V = 0
    x[0, 0, 1] = 77  # a grey pixel: S = 0
    out = corrupt(x, "brightness", 4)
    c = C._BRIGHTNESS[3]
    for i in range(8):
        for j in range(8):
            h, s, v = colorsys.rgb_to_hsv(*(x[0, i, j] / 255.0))
            ref = np.array(colorsys.hsv_to_rgb(h, s, min(v + c, 1.0))) * 255
            assert np.abs(out[0, i, j].astype(float) - ref).max() <= 1.0


def test_clipped_zoom_matches_scipy_zoom():
    x = np.random.default_rng(2).random((2, 32, 32, 3))
    for factor in (1.0, 1.07, 1.25, 1.75, 2.25):
        ch = int(np.ceil(32 / factor))
        top = (32 - ch) // 2
        ref = ndimage.zoom(x[:, top : top + ch, top : top + ch], (1, factor, factor, 1), order=1)
        trim = (ref.shape[1] - 32) // 2
        expected = ref[:, trim : trim + 32, trim : trim + 32]
        np.testing.assert_allclose(C._clipped_zoom(x, factor), expected, atol=1e-12)


def test_motion_kernel_is_one_sided_half_gaussian():
    kernel = C._motion_kernel(6, 2, 0.0)
    centre = kernel.shape[0] // 2
    assert kernel.sum() == pytest.approx(1.0, abs=1e-6)
    row = kernel[centre]
    assert np.count_nonzero(kernel) == np.count_nonzero(row) == 13  # 2·ceil(6)+1 taps
    assert np.all(row[:centre] == 0) and np.all(np.diff(row[centre:]) < 0)


# ---------------------------------------------------------------- errors


def test_unknown_name_suggests_close_match(images):
    with pytest.raises(CfdebugError, match="gaussian_noise") as info:
        corrupt(images, "gausian_noise", 1)
    assert "Did you mean 'gaussian_noise'" in str(info.value)
    assert "jpeg_compression" in str(info.value)  # lists the valid names


@pytest.mark.parametrize("severity", [0, 6, 7, -1, 2.0, "3", True, None])
def test_bad_severity(images, severity):
    with pytest.raises(CfdebugError, match=r"Expected `severity` to be an integer in 1\.\.5, but got"):
        corrupt(images, "fog", severity)


def test_severity_message_form(images):
    expected = r"^Expected `severity` to be an integer in 1\.\.5, but got 7\. "
    with pytest.raises(CfdebugError, match=expected):
        corrupt(images, "fog", 7)


def test_numpy_integer_severity_and_seed(images):
    out = corrupt(images, "fog", np.int64(2), seed=np.int32(5))
    np.testing.assert_array_equal(out, corrupt(images, "fog", 2, seed=5))


@pytest.mark.parametrize(
    "bad, pattern",
    [
        (np.zeros((2, 32, 32, 3), np.float32), "dtype uint8"),
        (np.zeros((32, 32), np.uint8), "shape"),
        (np.zeros((2, 32, 32, 4), np.uint8), "shape"),
        (np.zeros((2, 3, 32, 32), np.uint8), "shape"),
        (np.zeros((2, 4, 4, 3), np.uint8), "at least 8×8 pixels, but got 4×4"),
        (np.zeros((32, 7, 3), np.uint8), "at least 8×8 pixels, but got 32×7"),
        ([[[0, 0, 0]]], "numpy array"),
    ],
)
def test_bad_images(bad, pattern):
    with pytest.raises(CfdebugError, match=pattern):
        corrupt(bad, "contrast", 1)


def test_bad_seed(images):
    with pytest.raises(CfdebugError, match="`seed`"):
        corrupt(images, "fog", 1, seed=-1)


def test_empty_batch():
    empty = np.zeros((0, 32, 32, 3), np.uint8)
    assert corrupt(empty, "snow", 2).shape == (0, 32, 32, 3)
