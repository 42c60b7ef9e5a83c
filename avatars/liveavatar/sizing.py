"""Choosing the video size for a portrait, and fitting the portrait to it."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


def choose_size(height: int, width: int, max_area: int, divisor: int) -> tuple[int, int]:
    """The largest (H, W), multiples of `divisor`, with H·W ≤ max_area and the portrait's aspect ratio.

    Like the official pipeline the portrait is then resized and center-cropped to that size; unlike it, no
    padding is involved (every shipped example gives 704×384 under 720·400 both ways).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}×{width}")
    if max_area < divisor * divisor:
        raise ValueError(f"max_area {max_area} is smaller than one {divisor}×{divisor} tile")
    scale = math.sqrt(max_area / (height * width))
    h = max(divisor, round(height * scale / divisor) * divisor)
    w = max(divisor, round(width * scale / divisor) * divisor)
    while h * w > max_area:
        # Shrink the side that overshoots its ideal the most, keeping the aspect ratio close.
        if h / (height * scale) >= w / (width * scale) and h > divisor:
            h -= divisor
        elif w > divisor:
            w -= divisor
        else:
            h -= divisor
    return h, w


def fit_portrait(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize so the image covers (height, width), then center-crop to it. uint8 RGB in, uint8 RGB out."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"portrait must be an RGB image [H, W, 3], got shape {tuple(image.shape)}")
    ih, iw = image.shape[:2]
    scale = max(height / ih, width / iw)
    rh, rw = max(height, round(ih * scale)), max(width, round(iw * scale))
    resized = Image.fromarray(image).resize((rw, rh), Image.Resampling.BICUBIC)
    top, left = (rh - height) // 2, (rw - width) // 2
    return np.asarray(resized.crop((left, top, left + width, top + height)))
