"""One portrait reader: a phone photo stored sideways with an EXIF orientation gives the same upright portrait, the
same video size and the same frames from the CLI and from the app."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from app.inputs import prepare_run
from avatars.base import GenerationRequest
from avatars.liveavatar.cli import main
from avatars.liveavatar.loading import build_tiny_pipeline
from avatars.media.audio import resample
from avatars.media.portrait import check_rgb_image, read_portrait
from avatars.media.run_video import RunVideoWriter

EXAMPLES = Path(__file__).resolve().parents[2].parent / "shared" / "examples"
EXIF_ORIENTATION = 0x0112
ROTATE_90_CW = 6  # "the camera was turned": show the stored pixels turned 90° clockwise


@pytest.fixture
def sideways_photo(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """The example portrait stored turned 90° counter-clockwise, with the EXIF tag that turns it back."""
    upright = np.asarray(Image.open(EXAMPLES / "fashion_blogger.jpg").convert("RGB"))
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_90_CW
    path = tmp_path / "phone.jpg"
    stored.save(path, "JPEG", exif=exif, quality=95)
    return path, upright


def video_frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_cli_and_app_read_a_sideways_phone_photo_upright_and_make_the_same_video(sideways_photo, tmp_path):
    path, upright = sideways_photo
    portrait = read_portrait(path).image
    assert portrait.shape == upright.shape  # turned back: portrait, not landscape
    assert np.abs(portrait.astype(int) - upright.astype(int)).mean() < 8  # JPEG noise only, same picture

    speech = (
        tmp_path / "speech.wav"
    )  # at the model's rate, so both front ends hand the pipeline equal samples
    samples, rate = sf.read(EXAMPLES / "fashion_blogger.wav", dtype="float32")
    sf.write(speech, resample(samples[: rate // 2], rate, 16_000), 16_000, subtype="FLOAT")
    pipe = build_tiny_pipeline()
    app_spec = prepare_run(
        portrait=path, audio=speech, text=None, prompt="", policy="Full", k_fraction=0.5, t_warm=6, lam=1e-3,
        seed=0, size="64×64 area", size_choices=pipe.size_choices(), sample_rate=pipe.sample_rate,
        speech_dir=tmp_path, live=False,
    )  # fmt: skip
    np.testing.assert_array_equal(app_spec.portrait, portrait)  # the app reads exactly what the CLI reads

    out = tmp_path / "cli.mp4"
    argv = ["--portrait", str(path), "--audio", str(speech), "--policy", "full", "--max-area", "4096"]
    argv += ["--out", str(out)]
    assert main(argv, pipe) == 0
    cli_frames = video_frames(out)
    assert (
        app_spec.max_area == 4096
    )  # the smaller size, in both front ends: the tiny VAE's work grows with it
    request = GenerationRequest(
        portrait=app_spec.portrait, audio=app_spec.audio, sample_rate=pipe.sample_rate, max_area=4096
    )
    app_video = RunVideoWriter(tmp_path / "app.mp4")  # the writer both front ends use
    for chunk in pipe.stream(request):
        app_video.add(chunk)
    app_frames = video_frames(app_video.close())
    assert cli_frames.shape[1:] == (*pipe.output_size(portrait, 4096), 3)
    np.testing.assert_array_equal(cli_frames, app_frames)


def test_the_decoded_portrait_check_is_one_rule() -> None:
    good = np.zeros((4, 4, 3), dtype=np.uint8)
    assert check_rgb_image(good) is good
    for bad in (good.astype(np.float32), good[..., :2], good[0], "portrait.png"):
        with pytest.raises(ValueError, match=r"uint8 RGB image \[H, W, 3\]"):
            check_rgb_image(bad)
