"""The app's own offline example: a portrait and a line of speech, made here rather than downloaded.

The portrait is scikit-image's bundled `astronaut` photograph (public domain, NASA) when scikit-image is
installed, otherwise a face drawn with PIL. The speech is synthesised with espeak-ng on first use. Both
are cached as files (Gradio examples are file paths) in a folder under the temp dir.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

from app import tts
from app.media import temp_root

EXAMPLE_TEXT = (
    "Hello! I am a streaming avatar. The words you hear were typed as text, "
    "and my face moves with them as the video is generated."
)
CACHE_DIR_NAME = "ispa-avatar-examples"


@dataclass(frozen=True)
class BundledExample:
    portrait: Path  # PNG
    audio: Path  # WAV, mono
    text: str  # what the audio says, for the text-to-speech box


def cache_dir() -> Path:
    path = temp_root() / CACHE_DIR_NAME
    path.mkdir(parents=True, exist_ok=True)
    return path


def example_portrait() -> np.ndarray:
    """[H, W, 3] uint8 RGB: the astronaut photo if scikit-image is installed, else a drawn face."""
    try:
        from skimage import data
    except ImportError:
        return drawn_portrait()
    return np.ascontiguousarray(data.astronaut())


def drawn_portrait(width: int = 384, height: int = 512) -> np.ndarray:
    """A simple front-facing cartoon head and shoulders, so the app has a portrait with no data package."""
    img = Image.new("RGB", (width, height), (70, 110, 160))
    d = ImageDraw.Draw(img)
    cx, cy = width // 2, int(height * 0.42)
    hw, hh = int(width * 0.24), int(height * 0.22)  # half width / height of the face
    d.ellipse([cx - 2 * hw, height * 0.8, cx + 2 * hw, height * 1.3], fill=(40, 60, 90))  # shoulders
    d.rectangle([cx - hw // 3, cy + hh * 0.8, cx + hw // 3, height * 0.85], fill=(214, 170, 140))  # neck
    d.ellipse([cx - hw * 1.1, cy - hh * 1.25, cx + hw * 1.1, cy + hh * 0.3], fill=(60, 40, 30))  # hair
    d.ellipse([cx - hw, cy - hh, cx + hw, cy + hh], fill=(224, 180, 150))  # face
    for side in (-1, 1):
        ex, ey = cx + side * hw * 0.42, cy - hh * 0.15
        d.ellipse([ex - hw * 0.2, ey - hh * 0.1, ex + hw * 0.2, ey + hh * 0.1], fill=(250, 250, 250))
        d.ellipse([ex - hw * 0.08, ey - hh * 0.08, ex + hw * 0.08, ey + hh * 0.08], fill=(50, 35, 25))
        d.line([ex - hw * 0.22, ey - hh * 0.22, ex + hw * 0.22, ey - hh * 0.26], fill=(60, 40, 30), width=4)
    d.line([cx, cy - hh * 0.05, cx - hw * 0.08, cy + hh * 0.25, cx + hw * 0.05, cy + hh * 0.28], fill=(170, 120, 100), width=3)  # fmt: skip
    d.arc([cx - hw * 0.4, cy + hh * 0.3, cx + hw * 0.4, cy + hh * 0.6], start=20, end=160, fill=(150, 60, 60), width=5)  # fmt: skip
    return np.asarray(img)


def _write_once(path: Path, write: Callable[[Path], None]) -> Path:
    """Create `path` if absent; the write goes to a temporary name first, so readers never see half a file."""
    if not path.is_file():
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
        try:
            write(partial)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
    return path


def bundled_example(text: str = EXAMPLE_TEXT) -> BundledExample:
    """The example's files, made on first use and reused after (each file is keyed by what it holds)."""
    folder = cache_dir()
    image = example_portrait()
    image_key = hashlib.sha256(image.tobytes()).hexdigest()[:16]  # the photo and the drawing differ
    portrait = _write_once(
        folder / f"portrait-{image_key}.png", lambda p: Image.fromarray(image).save(p, "PNG")
    )
    key = hashlib.sha256(f"{tts.DEFAULT_VOICE}|{tts.DEFAULT_WORDS_PER_MINUTE}|{text}".encode()).hexdigest()[
        :16
    ]

    def speak(path: Path) -> None:
        speech = tts.synthesize(text, folder)
        sf.write(path, speech.samples, speech.sample_rate, format="WAV", subtype="PCM_16")

    audio = _write_once(folder / f"speech-{key}.wav", speak)
    return BundledExample(portrait=portrait, audio=audio, text=text)
