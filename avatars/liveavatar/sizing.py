"""The size choices a pipeline offers, choosing the video size for a portrait, and fitting the portrait to it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from avatars.media.portrait import check_rgb_image


@dataclass(frozen=True)
class SizeChoice:
    """A pixel budget for the video: each portrait gets the largest size of its own aspect ratio within it."""

    label: str
    max_area: int


TINY_SIZES = (SizeChoice("128×64 area", 128 * 64), SizeChoice("64×64 area", 64 * 64))
# The official budget is 720·400 pixels, which a 16:9 portrait turns into 704×384.
LIVEAVATAR_SIZES = (
    SizeChoice("720×400 area (official)", 720 * 400),
    SizeChoice("512×320 area (faster)", 512 * 320),
)


SIZE_DIVISOR = 64  # of video height and width: the FramePack 4× bucket needs latents in multiples of 8

# Memory is planned per size choice before any portrait is seen, at what the choice gives a 16:9 (height : width)
# portrait, the shape of every shipped example: 704×384 under the official area.
PLANNED_ASPECT = (16, 9)


def planned_size(max_area: int, divisor: int) -> tuple[int, int]:
    """(height, width) a size choice is planned at: its size for a 16:9 portrait."""
    return choose_size(*PLANNED_ASPECT, max_area, divisor)


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
    check_rgb_image(image)
    ih, iw = image.shape[:2]
    scale = max(height / ih, width / iw)
    rh, rw = max(height, round(ih * scale)), max(width, round(iw * scale))
    resized = Image.fromarray(image).resize((rw, rh), Image.Resampling.BICUBIC)
    top, left = (rh - height) // 2, (rw - width) // 2
    return np.asarray(resized.crop((left, top, left + width, top + height)))
