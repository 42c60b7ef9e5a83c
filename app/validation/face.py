"""Is there a face in the portrait? A warning only: the portrait is used either way.

Two detectors whose models ship inside their packages, so nothing is downloaded at run time:

- dlib's HOG frontal-face detector (`dlib.get_frontal_face_detector`, compiled into the library; the `dlib-bin`
  wheel, 4 MB, no dependencies), run with one 2× upsampling so faces down to about 40 px are seen;
- OpenCV's frontal-face Haar cascade (bundled with `opencv-python-headless<5`).

A face counts as found when either finds one. Measured on the shared portraits and made-up variants (README,
"The face check"): HOG finds the real photos also when over-exposed, where the cascade misses them, and the
cascade finds stylised characters (the dwarven blacksmith) that HOG misses. Neither fires on a sky-like gradient,
a flat colour, noise or the face-free photos scikit-image ships, except that the cascade alone sees a face among
coins (a missed warning, not a wrong one). Where neither library is installed the check does not run (None).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

CHECK_SIDE = 640  # detectors see a copy at most this many pixels on its longer side
HOG_UPSAMPLE = 1


@lru_cache(maxsize=1)
def _hog_detector() -> Any | None:
    """dlib's HOG frontal-face detector, or None where dlib is not installed."""
    try:
        import dlib
    except ImportError:
        logger.info("dlib (the dlib-bin package) is not installed; the face check uses OpenCV's cascade only")
        return None
    return dlib.get_frontal_face_detector()


@lru_cache(maxsize=1)
def _face_cascade() -> Any | None:
    """OpenCV's bundled frontal-face Haar cascade, or None where OpenCV or its cascade is missing (OpenCV 5)."""
    try:
        import cv2
    except ImportError:
        return None
    cascade_dir = getattr(getattr(cv2, "data", None), "haarcascades", None)
    if cascade_dir is None or not hasattr(cv2, "CascadeClassifier"):
        return None
    cascade = cv2.CascadeClassifier(str(Path(cascade_dir) / "haarcascade_frontalface_default.xml"))
    return None if cascade.empty() else cascade


def hog_finds_face(image: np.ndarray) -> bool | None:
    detector = _hog_detector()
    if detector is None:
        return None
    rects, _, _ = detector.run(np.ascontiguousarray(image), HOG_UPSAMPLE, 0.0)
    return len(rects) > 0


def haar_finds_face(image: np.ndarray) -> bool | None:
    cascade = _face_cascade()
    if cascade is None:
        return None
    import cv2

    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    min_face = max(24, min(grey.shape) // 10)
    faces = cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(min_face, min_face))
    return len(faces) > 0


DETECTORS: tuple[Callable[[np.ndarray], bool | None], ...] = (hog_finds_face, haar_finds_face)


def find_face(image: np.ndarray) -> bool | None:
    """True when a detector finds a face in the RGB uint8 `image`, False when those that ran found none, None
    when none could run."""
    small = _shrink(image)
    ran = False
    for detector in DETECTORS:
        found = detector(small)
        if found:
            return True
        ran = ran or found is not None
    if not ran:
        logger.warning("no face detector is available (needs dlib-bin or opencv-python-headless<5); skipping")
        return None
    return False


def _shrink(image: np.ndarray) -> np.ndarray:
    """A copy at most CHECK_SIDE px on its longer side (area averaging, OpenCV's where installed: the figures
    in the module's docstring were measured with it), or the image itself when smaller."""
    scale = CHECK_SIDE / max(image.shape[:2])
    if scale >= 1:
        return image
    size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
    try:
        import cv2
    except ImportError:
        from PIL import Image

        return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)
