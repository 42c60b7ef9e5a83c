"""How far two runs' frames drift apart, chunk by chunk: PSNR and SSIM, computed here with no model weights.

SSIM is scikit-image's `structural_similarity` (Wang et al. 2004, "Image quality assessment: from error
visibility to structural similarity") on BT.601 luma: an 11×11 Gaussian window with σ = 1.5, population (not
sample) variances, and the mean over the positions where the window fits inside the frame. It is about four
times faster on the CPU than the float64 torch convolutions this module used before, with the same values
(the test keeps that computation as its reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from skimage.metrics import structural_similarity

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # scikit-image truncates the Gaussian at 3.5 σ: an 11-tap window
SSIM_K1, SSIM_K2 = 0.01, 0.03
_BT601 = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class ChunkDrift:
    index: int
    psnr_db: float  # inf when the chunks are identical
    ssim: float  # mean over the chunk's frames; 1.0 when identical


def luma(frames: np.ndarray) -> np.ndarray:
    """BT.601 luma of RGB frames [..., 3], as float64 on the input's scale."""
    if frames.shape[-1] != 3:
        raise ValueError(f"expected RGB frames [..., 3], got shape {frames.shape}")
    rgb = frames.astype(np.float64)
    return _BT601[0] * rgb[..., 0] + _BT601[1] * rgb[..., 1] + _BT601[2] * rgb[..., 2]


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"frames to compare must have the same shape, got {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("cannot compare empty frames")


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB over all pixels and channels (inf for identical inputs)."""
    _check_pair(a, b)
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Mean SSIM on luma of RGB frames [H, W, 3] or [T, H, W, 3]; averaged over frames."""
    _check_pair(a, b)
    ya, yb = luma(a), luma(b)
    if ya.ndim == 2:
        ya, yb = ya[None], yb[None]
    if min(ya.shape[-2:]) < 2 * SSIM_RADIUS + 1:
        raise ValueError(
            f"SSIM needs frames of at least {2 * SSIM_RADIUS + 1} pixels per side, got {a.shape}"
        )
    scores = [
        structural_similarity(
            x,
            y,
            data_range=data_range,
            gaussian_weights=True,
            sigma=SSIM_SIGMA,
            use_sample_covariance=False,
            K1=SSIM_K1,
            K2=SSIM_K2,
        )
        for x, y in zip(ya, yb, strict=True)
    ]
    return float(np.mean(scores))


def chunk_drift(index: int, frames_a: np.ndarray, frames_b: np.ndarray) -> ChunkDrift:
    """Drift between the same chunk of two runs (e.g. Full vs ISPA): PSNR over the chunk, mean SSIM."""
    return ChunkDrift(index=index, psnr_db=psnr(frames_a, frames_b), ssim=ssim(frames_a, frames_b))
