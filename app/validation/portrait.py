"""Portrait check: the project's portrait reader (`avatars.media.portrait`), plus a warning when no face is found."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from app.validation.errors import ValidationError
from avatars.media.portrait import (
    MAX_PORTRAIT_PIXELS,
    MAX_PORTRAIT_SIDE,
    PortraitReadError,
    read_portrait,
)

logger = logging.getLogger(__name__)


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
    """Read an uploaded portrait with the project's portrait reader, and warn when no face is found."""
    if source is None:
        raise ValidationError("Please provide a portrait image.")
    try:
        portrait = read_portrait(source, max_side=max_side, max_pixels=max_pixels)
    except PortraitReadError as err:
        raise ValidationError(str(err)) from None
    notes = list(portrait.notes)
    face_found = _find_face(portrait.image)
    if face_found is False:
        notes.append(
            "No face was found in the portrait. It will still be used, but the avatar works best "
            "with one clearly visible, front-facing face."
        )
    return PortraitCheck(image=portrait.image, face_found=face_found, warnings=notes)


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
