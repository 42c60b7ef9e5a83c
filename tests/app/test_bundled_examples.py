"""The app's own example: made offline, cached under the temp dir, and valid input for the app."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app import examples, tts
from app.validation import validate_audio, validate_portrait


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_example_portrait_is_the_bundled_photo_and_has_a_face() -> None:
    from skimage import data

    image = examples.example_portrait()
    np.testing.assert_array_equal(image, data.astronaut())
    assert validate_portrait(_png(image)).face_found is True


def test_without_scikit_image_a_face_is_drawn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "skimage", None)
    image = examples.example_portrait()
    np.testing.assert_array_equal(image, examples.drawn_portrait())
    assert image.shape == (512, 384, 3) and image.dtype == np.uint8
    check = validate_portrait(_png(image))
    assert check.face_found is True and check.warnings == []


def test_bundled_example_files_are_made_once_under_the_temp_dir(
    _isolated_temp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    example = examples.bundled_example()
    cache = _isolated_temp / examples.CACHE_DIR_NAME
    assert example.portrait.parent == cache and example.audio.parent == cache
    assert sorted(p.name for p in cache.iterdir()) == sorted([example.portrait.name, example.audio.name])
    np.testing.assert_array_equal(np.asarray(Image.open(example.portrait)), examples.example_portrait())
    speech = validate_audio(example.audio, target_rate=16_000)
    assert speech.seconds > 3.0 and example.text == examples.EXAMPLE_TEXT

    monkeypatch.setattr(tts, "synthesize", lambda *a, **k: pytest.fail("the cached speech must be reused"))
    again = examples.bundled_example()
    assert again == example


def test_other_text_gets_its_own_speech_file() -> None:
    first = examples.bundled_example("Good morning.")
    second = examples.bundled_example("Good evening, and welcome.")
    assert first.portrait == second.portrait and first.audio != second.audio
    assert (
        validate_audio(second.audio, target_rate=16_000).seconds
        > validate_audio(first.audio, target_rate=16_000).seconds
    )
