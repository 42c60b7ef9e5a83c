"""The face check on the shared portraits, a smiling astronaut photo and its over-exposed copy (which the Haar
cascade alone misses), and on made-up and real images without a face. Each detector is also checked alone, for
the reason both are kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage import data

from app.validation import face, validate_portrait
from avatars.media.portrait import read_portrait

SHARED_PORTRAITS = ("fashion_blogger.jpg", "man.png", "dwarven_blacksmith.jpg", "cyclops_baker.jpg")


def over_exposed(image: np.ndarray) -> np.ndarray:
    return np.clip(image.astype(np.int32) * 1.6 + 40, 0, 255).astype(np.uint8)


def sky_gradient(height: int = 384, width: int = 640) -> np.ndarray:
    """A landscape-like picture: a sky going from pale to deep blue over a green band."""
    image = np.zeros((height, width, 3), np.uint8)
    rows = np.linspace(0.0, 1.0, height)[:, None]
    image[..., 0] = (200 - 120 * rows).astype(np.uint8)
    image[..., 1] = (220 - 100 * rows).astype(np.uint8)
    image[..., 2] = 255
    image[height * 2 // 3 :] = (70, 130, 60)
    return image


def as_rgb(image: np.ndarray) -> np.ndarray:
    return np.stack([image] * 3, -1) if image.ndim == 2 else image[..., :3]


@pytest.mark.parametrize("name", SHARED_PORTRAITS)
def test_every_shared_portrait_has_a_face(examples_dir: Path, name: str) -> None:
    check = validate_portrait(examples_dir / name)
    assert check.face_found is True and not any("No face" in w for w in check.warnings)


def test_a_smiling_front_facing_photo_is_seen_also_over_exposed() -> None:
    photo = data.astronaut()
    assert face.find_face(photo) is True
    bright = face._shrink(over_exposed(photo))
    assert face.haar_finds_face(bright) is False  # what the app used alone before
    assert face.hog_finds_face(bright) is True
    assert face.find_face(over_exposed(photo)) is True


@pytest.mark.parametrize(
    "image",
    [
        pytest.param(sky_gradient(), id="landscape-gradient"),
        pytest.param(np.full((384, 640, 3), (120, 160, 90), np.uint8), id="flat-colour"),
        pytest.param(np.random.default_rng(0).integers(0, 256, (384, 640, 3), dtype=np.uint8), id="noise"),
        pytest.param(data.coffee(), id="coffee"),
        pytest.param(data.rocket(), id="rocket"),
        pytest.param(as_rgb(data.brick()), id="brick"),
        pytest.param(as_rgb(data.page()), id="page"),
    ],
)
def test_pictures_without_a_face_get_the_warning(image: np.ndarray) -> None:
    assert face.find_face(image) is False


def test_each_detector_sees_what_the_other_misses(examples_dir: Path) -> None:
    """HOG alone misses the stylised blacksmith, which the cascade finds: the reason both run."""
    blacksmith = face._shrink(read_portrait(examples_dir / "dwarven_blacksmith.jpg").image)
    assert face.hog_finds_face(blacksmith) is False and face.haar_finds_face(blacksmith) is True


def test_with_one_detector_missing_the_other_still_answers(
    examples_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photo = read_portrait(examples_dir / "man.png").image
    monkeypatch.setattr(face, "_hog_detector", lambda: None)  # no dlib-bin (a platform without its wheel)
    assert face.find_face(photo) is True and face.find_face(sky_gradient()) is False
