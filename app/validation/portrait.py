"""Portrait check: decode an upload to upright RGB within size limits, and warn when no face is found."""

from __future__ import annotations

import io
import logging
import warnings as _warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from app.validation.errors import ValidationError

logger = logging.getLogger(__name__)

MAX_PORTRAIT_PIXELS = 40_000_000  # refused before decoding: a bigger image costs too much memory to open
MAX_PORTRAIT_SIDE = 2048  # downscaled to this; the model works at ~704 px anyway
MIN_PORTRAIT_SIDE = 64
PORTRAIT_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")


@dataclass
class PortraitCheck:
    image: np.ndarray  # [H, W, 3] uint8 RGB, upright
    face_found: bool | None  # None: no face check ran (OpenCV missing, or without its Haar cascade)
    warnings: list[str] = field(default_factory=list)


def validate_portrait(
    source: str | Path | bytes | None,
    *,
    max_side: int = MAX_PORTRAIT_SIDE,
    max_pixels: int = MAX_PORTRAIT_PIXELS,
) -> PortraitCheck:
    """Decode an uploaded portrait to upright RGB, within size limits, and warn when no face is found."""
    if source is None:
        raise ValidationError("Please provide a portrait image.")
    notes: list[str] = []
    with _open_image(source) as img:
        width, height = img.size
        if width * height > max_pixels:
            raise ValidationError(
                f"The portrait is {width}×{height} pixels ({width * height / 1e6:.1f} MP); "
                f"the limit is {max_pixels / 1e6:.1f} MP. Please upload a smaller image."
            )
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            raise ValidationError(
                "The portrait could not be decoded: the image file looks truncated or corrupt."
            ) from None
        upright = ImageOps.exif_transpose(img)
        rgb = _to_rgb(upright)
    if min(rgb.size) < MIN_PORTRAIT_SIDE:
        raise ValidationError(
            f"The portrait is {rgb.width}×{rgb.height} pixels; it needs at least "
            f"{MIN_PORTRAIT_SIDE} pixels on each side."
        )
    if max(rgb.size) > max_side:
        before = rgb.size
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        notes.append(f"The portrait was downscaled from {before[0]}×{before[1]} to {rgb.width}×{rgb.height}.")
    image = np.asarray(rgb, dtype=np.uint8)
    face_found = _find_face(image)
    if face_found is False:
        notes.append(
            "No face was found in the portrait. It will still be used, but the avatar works best "
            "with one clearly visible, front-facing face."
        )
    return PortraitCheck(image=image, face_found=face_found, warnings=notes)


def _open_image(source: str | Path | bytes) -> Image.Image:
    fp: Any = io.BytesIO(source) if isinstance(source, bytes) else Path(source)
    if isinstance(fp, Path) and not fp.is_file():
        raise ValidationError("The portrait file could not be found; please upload it again.")
    try:
        with _warnings.catch_warnings():
            # Our own pixel cap applies; PIL's bomb warning would only add noise.
            _warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp, formats=PORTRAIT_FORMATS)
    except Image.DecompressionBombError:
        raise ValidationError(
            "The portrait is far too large to open. Please upload a smaller image."
        ) from None
    except (OSError, SyntaxError, ValueError):
        raise ValidationError(
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


@lru_cache(maxsize=1)
def _face_cascade() -> Any | None:
    """OpenCV's bundled frontal-face Haar cascade, or None where the build has none (OpenCV 5 dropped it)."""
    import cv2

    cascade_dir = getattr(getattr(cv2, "data", None), "haarcascades", None)
    if cascade_dir is None or not hasattr(cv2, "CascadeClassifier"):
        return None
    cascade = cv2.CascadeClassifier(str(Path(cascade_dir) / "haarcascade_frontalface_default.xml"))
    return None if cascade.empty() else cascade


def _find_face(image: np.ndarray) -> bool | None:
    """Haar-cascade face check on a copy at most 640 px wide; None when no cascade is available."""
    try:
        import cv2
    except ImportError:
        logger.info("opencv-python-headless is not installed; skipping the portrait's face check")
        return None
    cascade = _face_cascade()
    if cascade is None:
        logger.warning(
            "this OpenCV build has no Haar face cascade (needs opencv-python-headless<5); skipping"
        )
        return None
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    scale = 640 / max(grey.shape)
    if scale < 1:
        size = (round(grey.shape[1] * scale), round(grey.shape[0] * scale))
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
    min_face = max(24, min(grey.shape) // 10)
    faces = cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(min_face, min_face))
    return len(faces) > 0
