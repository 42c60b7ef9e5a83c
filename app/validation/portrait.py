"""Portrait check: the project's portrait reader (`avatars.media.portrait`), plus a warning when no face is found
(`app.validation.face`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from app.validation.errors import ValidationError
from app.validation.face import find_face
from avatars.media.portrait import (
    MAX_PORTRAIT_PIXELS,
    MAX_PORTRAIT_SIDE,
    PortraitReadError,
    read_portrait,
)


@dataclass
class PortraitCheck:
    image: np.ndarray  # [H, W, 3] uint8 RGB, upright
    face_found: bool | None  # None: no face check ran (neither dlib nor OpenCV's cascade is installed)
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
    face_found = find_face(portrait.image)
    if face_found is False:
        notes.append(
            "No face was found in the portrait. It will still be used, but the avatar works best "
            "with one clearly visible, front-facing face."
        )
    return PortraitCheck(image=portrait.image, face_found=face_found, warnings=notes)
