"""The Generate button's input checks and the per-session server state (run controls, folders, live feed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from app.inputs import COMPARE, FULL, ISPA, choose_size, prepare_run
from app.media import RunDir
from app.models import hide_paths
from app.sessions import Sessions
from app.validation import ValidationError, validate_audio, validate_prompt
from ispa import FullPolicy, ISPAPolicy

SIZES = [("128×64 area", 8192), ("64×64 area", 4096)]
RATE = 16000


@pytest.fixture
def short_speech(examples_dir: Path, tmp_path: Path) -> Path:
    audio, rate = sf.read(examples_dir / "fashion_blogger.wav", dtype="float32")
    path = tmp_path / "speech.wav"
    sf.write(path, audio[: rate // 2], rate)
    return path


def prepare(examples_dir: Path, tmp_path: Path, **overrides):
    args = dict(
        portrait=examples_dir / "fashion_blogger.jpg",
        audio=None,
        text=None,
        prompt="",
        policy=ISPA,
        k_fraction=0.25,
        t_warm=7,
        lam=0.01,
        seed=5,
        size="default",
        size_choices=SIZES,
        sample_rate=RATE,
        speech_dir=tmp_path,
    )
    return prepare_run(**(args | overrides))


def test_each_mode_makes_its_runs_with_the_chosen_settings(
    examples_dir: Path, tmp_path: Path, short_speech: Path
):
    spec = prepare(examples_dir, tmp_path, audio=short_speech, policy=COMPARE)
    runs = spec.policies()
    assert [name for name, _ in runs] == [FULL, ISPA]
    assert isinstance(runs[0][1], FullPolicy)
    ispa = runs[1][1]
    assert isinstance(ispa, ISPAPolicy)
    # T_warm 7 is rounded up to whole 3-frame blocks, and the rounding is reported.
    assert (ispa.k_fraction, ispa.t_warm, ispa.lam) == (0.25, 9, 0.01)
    assert any("T_warm = 7" in note for note in spec.warnings)
    assert spec.settings.seed == 5
    assert [n for n, _ in prepare(examples_dir, tmp_path, audio=short_speech, policy=FULL).policies()] == [
        FULL
    ]


def test_uploaded_audio_wins_over_text_and_is_resampled(
    examples_dir: Path, tmp_path: Path, short_speech: Path
):
    spec = prepare(examples_dir, tmp_path, audio=short_speech, text="Hello there.")
    expected = validate_audio(short_speech, target_rate=RATE).samples
    np.testing.assert_array_equal(spec.audio, expected)
    assert spec.audio_source == "audio"
    assert spec.speech_seconds == pytest.approx(len(expected) / RATE)
    assert any("audio was used" in note for note in spec.warnings)
    assert spec.portrait.dtype == np.uint8 and spec.portrait.shape[2] == 3


def test_text_is_spoken_offline_when_no_audio_is_given(examples_dir: Path, tmp_path: Path) -> None:
    spec = prepare(examples_dir, tmp_path, text="Hello, this is a short test.")
    assert spec.audio_source == "text"
    assert spec.audio.dtype == np.float32 and spec.speech_seconds > 1.0
    assert float(np.sqrt(np.mean(spec.audio**2))) > 0.01
    assert not any(tmp_path.glob("tts-*.wav"))  # the synthesised file is not left behind


def test_live_mode_needs_no_speech_up_front(examples_dir: Path, tmp_path: Path) -> None:
    spec = prepare(examples_dir, tmp_path, live=True)
    assert spec.audio is None and spec.audio_source == "live" and spec.speech_seconds is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"audio": None, "text": "  "}, "Please provide the driving audio"),
        ({"policy": "Turbo"}, "The policy must be one of: ISPA, Full, Compare"),
        ({"size": "huge"}, "The size must be 'default' or one of: 128×64 area, 64×64 area"),
        ({"prompt": "x" * 501}, "The prompt is 501 characters long"),
        ({"k_fraction": 0}, r"k_fraction\) must be a number in \(0, 1\], got 0"),
        ({"portrait": None}, "Please provide a portrait image"),
    ],
)
def test_bad_inputs_are_named(
    examples_dir: Path, tmp_path: Path, short_speech: Path, overrides, message
) -> None:
    with pytest.raises(ValidationError, match=message):
        prepare(examples_dir, tmp_path, **({"audio": short_speech} | overrides))


def test_sizes_prompt_and_paths() -> None:
    assert choose_size("default", SIZES) == SIZES[0]
    assert choose_size(None, SIZES) == SIZES[0]
    assert choose_size("64×64 area", SIZES) == SIZES[1]
    assert validate_prompt("  a   person\n speaks ").text == "a person speaks"
    hidden = hide_paths("weights not found in /root/.cache/huggingface/hub (missing /srv/w/dit.safetensors)")
    assert hidden == "weights not found in … (missing …)"
    assert hide_paths("needs an NVIDIA GPU (none found)") == "needs an NVIDIA GPU (none found)"


class FakeControl:
    def __init__(self) -> None:
        self.cancelled = 0
        self.recalibrations = 0

    def cancel(self) -> None:
        self.cancelled += 1

    def request_recalibration(self) -> None:
        self.recalibrations += 1


def test_a_new_run_replaces_the_previous_one_and_removes_its_folder(tmp_path: Path) -> None:
    sessions = Sessions()
    first_dir, second_dir = RunDir(tmp_path), RunDir(tmp_path)
    full, ispa = FakeControl(), FakeControl()
    first = sessions.begin_run("s1", first_dir, [full, ispa], recalibrable=[ispa])
    assert sessions.run("s1") is first and sessions.run("s2") is None
    assert first.recalibrate() == 1
    assert (full.recalibrations, ispa.recalibrations) == (0, 1)  # only the ISPA run recalibrates
    first.stop()
    assert first.stop_requested and (full.cancelled, ispa.cancelled) == (1, 1)
    first.finish(None)
    assert first.recalibrate() == 0  # nothing runs any more
    second = sessions.begin_run("s1", second_dir, [FakeControl()])
    assert sessions.run("s1") is second
    assert not first_dir.path.exists() and second_dir.path.exists()


def test_ending_a_session_stops_its_run_closes_its_feed_and_deletes_its_files(tmp_path: Path) -> None:
    sessions = Sessions()
    run_dir = RunDir(tmp_path)
    control = FakeControl()
    sessions.begin_run("s1", run_dir, [control])
    old_feed = sessions.open_feed("s1")
    feed = sessions.open_feed("s1")
    assert old_feed.closed and not feed.closed and sessions.feed("s1") is feed
    sessions.end("s1")
    assert control.cancelled == 1 and feed.closed and not run_dir.path.exists()
    assert sessions.run("s1") is None and sessions.feed("s1") is None
    sessions.end("never-seen")  # harmless


def test_models_load_once_per_process_and_14b_reads_fp8_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from app import models

    loads: list[tuple[str, bool]] = []

    def fake_load(name: str, *, fp8: bool = False, device: object = None) -> object:
        loads.append((name, fp8))
        return object()

    monkeypatch.setattr(models, "_pool", None)
    monkeypatch.setattr(models.torch.cuda, "device_count", lambda: 1)  # the 14B model needs a CUDA slot
    monkeypatch.setattr(models, "load_pipeline", fake_load)
    monkeypatch.setattr(models, "model_availability", lambda: {"tiny": None, "14b": None})
    monkeypatch.setenv(models.FP8_ENV, "1")
    first = models.get_pipeline("tiny")
    assert models.get_pipeline("tiny") is first
    models.get_pipeline("14b")
    assert loads == [("tiny", False), ("14b", True)]

    monkeypatch.setattr(models, "model_availability", lambda: {"tiny": None, "14b": "needs an NVIDIA GPU"})
    assert models.default_model() == "tiny"
    with pytest.raises(
        ValidationError, match="LiveAvatar 14B model is not available here: needs an NVIDIA GPU"
    ):
        models.get_pipeline("14b")
    with pytest.raises(ValidationError, match="Unknown model 'huge'"):
        models.check_model("huge")


def test_sessions_idle_for_too_long_are_forgotten_with_their_files(tmp_path: Path) -> None:
    now = [0.0]
    sessions = Sessions(max_idle_seconds=100.0, clock=lambda: now[0])
    api_dir, live_dir, busy_dir = RunDir(tmp_path), RunDir(tmp_path), RunDir(tmp_path)
    sessions.finish(sessions.begin_run("api-client", api_dir, [FakeControl()]), None)
    sessions.finish(sessions.begin_run("live", live_dir, [FakeControl()]), None)
    sessions.open_feed("live")  # still recording: kept however old its last run is
    sessions.begin_run("busy", busy_dir, [FakeControl()])  # never finished: kept
    now[0] = 100.0
    sessions.begin_run("newcomer", RunDir(tmp_path), [FakeControl()])
    assert sessions.run("api-client") is not None  # exactly at the limit: kept
    now[0] = 100.5
    sessions.begin_run("another", RunDir(tmp_path), [FakeControl()])
    assert sessions.run("api-client") is None and not api_dir.path.exists()
    assert sessions.run("live") is not None and live_dir.path.exists()
    assert sessions.run("busy") is not None and busy_dir.path.exists()
    assert sessions.run("newcomer") is not None
