"""PSNR and SSIM against closed forms, a known noise level, and an explicit computation of Wang et al.'s SSIM
(the float64 torch convolutions the app used before it called scikit-image)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data

from app.metrics import SSIM_K1, SSIM_K2, SSIM_RADIUS, SSIM_SIGMA, chunk_drift, luma, psnr, ssim


def reference_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM on luma, written out: separable Gaussian means, population (co)variances, only the positions
    where the whole 11×11 window fits, averaged over frames."""
    x, y = (torch.from_numpy(luma(f)).reshape(-1, 1, *f.shape[-3:-1]) for f in (a, b))
    taps = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64)
    window = torch.exp(-(taps**2) / (2 * SSIM_SIGMA**2))
    window = window / window.sum()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, window.view(1, 1, -1, 1)), window.view(1, 1, 1, -1))

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * 255) ** 2, (SSIM_K2 * 255) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean(dim=(1, 2, 3)).mean())


def noisy(image: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, image.shape)
    return np.clip(np.round(image + noise), 0, 255).astype(np.uint8)


def test_identical_frames() -> None:
    frames = data.astronaut()[None].repeat(2, axis=0)
    assert psnr(frames, frames.copy()) == math.inf
    assert ssim(frames, frames.copy()) == pytest.approx(1.0, abs=1e-12)


def test_constant_images_match_the_closed_form() -> None:
    """Flat 100 vs flat 110 grey: MSE 100; SSIM reduces to its luminance term (variances are zero)."""
    a = np.full((32, 40, 3), 100, dtype=np.uint8)
    b = np.full((32, 40, 3), 110, dtype=np.uint8)
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-12)
    c1 = (SSIM_K1 * 255) ** 2
    expected = (2 * 100.0 * 110.0 + c1) / (100.0**2 + 110.0**2 + c1)
    assert ssim(a, b) == pytest.approx(expected, rel=1e-6)  # the Gaussian sums leave ~1e-13 of rounding


def test_psnr_of_a_known_noise_level() -> None:
    """Gaussian noise of σ = 10 on mid-grey (no clipping), rounded to integers: MSE ≈ σ² + 1/12."""
    grey = np.full((256, 256, 3), 128, dtype=np.uint8)
    expected = 10 * math.log10(255**2 / (10.0**2 + 1 / 12))
    assert psnr(grey, noisy(grey, 10.0)) == pytest.approx(expected, abs=0.1)
    assert psnr(grey, noisy(grey, 20.0)) == pytest.approx(expected - 20 * math.log10(2), abs=0.1)


@pytest.mark.parametrize("sigma", [5.0, 25.0])
def test_ssim_matches_the_explicit_computation(sigma: float) -> None:
    image = data.astronaut()[:200, 100:320]
    other = noisy(image, sigma)
    reference = reference_ssim(image, other)
    assert ssim(image, other) == pytest.approx(reference, rel=1e-9)
    assert 0 < reference < 1
    frames_a = np.stack([image, image[::-1]])
    frames_b = np.stack([other, noisy(image[::-1], 2 * sigma, seed=3)])
    assert ssim(frames_a, frames_b) == pytest.approx(reference_ssim(frames_a, frames_b), rel=1e-9)


def test_ssim_averages_over_frames() -> None:
    image = data.astronaut()[:128, :128]
    a = np.stack([image, image])
    b = np.stack([noisy(image, 10.0, seed=1), noisy(image, 40.0, seed=2)])
    per_frame = [ssim(a[i], b[i]) for i in range(2)]
    assert ssim(a, b) == pytest.approx(sum(per_frame) / 2, rel=1e-12)
    assert per_frame[0] > per_frame[1]  # more noise, less similar


def test_luma_uses_bt601_weights() -> None:
    pixels = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]], dtype=np.uint8)
    np.testing.assert_allclose(luma(pixels), [0.299 * 255, 0.587 * 255, 0.114 * 255, 255.0])


def test_chunk_drift_pools_psnr_over_the_chunk() -> None:
    base = np.full((2, 24, 24, 3), 128, dtype=np.uint8)
    other = base.copy()
    other[1] += 10  # only the second frame differs: chunk MSE is 100 / 2
    drift = chunk_drift(7, base, other)
    assert drift.index == 7
    assert drift.psnr_db == pytest.approx(10 * math.log10(255**2 / 50), abs=1e-12)
    assert drift.ssim == pytest.approx((1 + ssim(base[1], other[1])) / 2, rel=1e-12)


def test_mismatched_or_tiny_frames_are_refused() -> None:
    with pytest.raises(ValueError, match="same shape"):
        psnr(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="at least 11 pixels"):
        ssim(np.zeros((8, 20, 3), np.uint8), np.zeros((8, 20, 3), np.uint8))
    with pytest.raises(ValueError, match="RGB"):
        luma(np.zeros((4, 4), np.uint8))
