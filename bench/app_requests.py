"""The benches' one way to make an app request: the shared example portrait and a cut of its speech, checked by
the app's own `prepare_run` as a page's request would be."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import soundfile as sf

EXAMPLES = Path(__file__).resolve().parents[2] / "shared" / "examples"


def example_request(pipe: Any, policy: str, seconds: float, work_dir: Path, prompt: str = "") -> Any:
    """A `RunSpec` for the fashion-blogger example with its first `seconds` of speech (written to `work_dir`)."""
    from app.inputs import prepare_run

    audio, rate = sf.read(EXAMPLES / "fashion_blogger.wav", dtype="float32")
    speech = work_dir / f"speech-{seconds:g}s.wav"
    sf.write(speech, audio[: round(seconds * rate)], rate)
    return prepare_run(
        portrait=EXAMPLES / "fashion_blogger.jpg",
        audio=speech,
        text=None,
        prompt=prompt,
        policy=policy,
        k_fraction=0.5,
        t_warm=6,
        lam=1e-3,
        seed=1,
        size="default",
        size_choices=pipe.size_choices(),
        sample_rate=pipe.sample_rate,
        speech_dir=work_dir,
    )


@contextmanager
def bench_temp_dir(prefix: str) -> Iterator[Path]:
    """One temporary folder for everything a bench writes (Gradio's and Python's temp files included)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        os.environ.setdefault("GRADIO_TEMP_DIR", tmp)
        tempfile.tempdir = tmp
        yield Path(tmp)
