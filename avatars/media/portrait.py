"""Portraits in: the one reader of image files and the one check of a decoded portrait.

The CLI and the app read portraits the same way: the format is one of a short list (no exotic PIL plugins on a
public server), the pixel count is checked before decoding (decompression bombs), the EXIF orientation is applied
(a phone photo stands upright), transparency is composited over white, 16-bit grey is scaled rather than clipped,
and a very large image is downscaled.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

MAX_PORTRAIT_PIXELS = 40_000_000  # refused before decoding: a bigger image costs too much memory to open
MAX_PORTRAIT_SIDE = 2048  # downscaled to this; the model works at ~704 px anyway
MIN_PORTRAIT_SIDE = 64
PORTRAIT_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")


class PortraitReadError(ValueError):
    """A portrait that cannot be used; the message is in plain words and names no server path."""


@dataclass(frozen=True)
class Portrait:
    image: np.ndarray  # [H, W, 3] uint8 RGB, upright
    notes: list[str] = field(default_factory=list)  # what was changed on the way (a downscale)


def check_rgb_image(image: Any) -> np.ndarray:
    """`image` if it is a decoded portrait, uint8 RGB [H, W, 3]; ValueError otherwise."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"portrait must be a uint8 RGB image [H, W, 3], got {got}")
    return image


def read_portrait(
    source: str | Path | bytes,
    *,
    max_side: int = MAX_PORTRAIT_SIDE,
    max_pixels: int = MAX_PORTRAIT_PIXELS,
) -> Portrait:
    """Decode an image file (or its bytes) to upright uint8 RGB within the size limits."""
    notes: list[str] = []
    with _open_image(source) as img:
        width, height = img.size
        if width * height > max_pixels:
            raise PortraitReadError(
                f"The portrait is {width}×{height} pixels ({width * height / 1e6:.1f} MP); "
                f"the limit is {max_pixels / 1e6:.1f} MP. Please use a smaller image."
            )
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            raise PortraitReadError(
                "The portrait could not be decoded: the image file looks truncated or corrupt."
            ) from None
        rgb = _to_rgb(ImageOps.exif_transpose(img))
    if min(rgb.size) < MIN_PORTRAIT_SIDE:
        raise PortraitReadError(
            f"The portrait is {rgb.width}×{rgb.height} pixels; it needs at least "
            f"{MIN_PORTRAIT_SIDE} pixels on each side."
        )
    if max(rgb.size) > max_side:
        before = rgb.size
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        notes.append(f"The portrait was downscaled from {before[0]}×{before[1]} to {rgb.width}×{rgb.height}.")
    return Portrait(image=np.asarray(rgb, dtype=np.uint8), notes=notes)


def _open_image(source: str | Path | bytes) -> Image.Image:
    fp: Any = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
    if isinstance(fp, Path) and not fp.is_file():
        raise PortraitReadError("The portrait file could not be found.")
    try:
        with warnings.catch_warnings():
            # Our own pixel cap applies; PIL's bomb warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp, formats=PORTRAIT_FORMATS)
    except Image.DecompressionBombError:
        raise PortraitReadError(
            "The portrait is far too large to open. Please use a smaller image."
        ) from None
    except (OSError, SyntaxError, ValueError):
        raise PortraitReadError(
            f"The portrait is not a readable image. Supported formats: {', '.join(PORTRAIT_FORMATS)}."
        ) from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB for every input mode: transparency over white, 16-bit grey scaled down rather than clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") else max(float(grey.max()), 1.0)
        return Image.fromarray(np.clip(grey / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")
