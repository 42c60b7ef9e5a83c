"""The Generate button's input checks and the per-session server state (run controls, folders, live feed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from app.inputs import COMPARE, FULL, ISPA, choose_size, prepare_run
from app.media import RunDir
from app.models import hide_paths
from app.sessions import Sessions, check_token
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


def test_a_closed_page_ends_the_runs_of_its_tokens_only(tmp_path: Path) -> None:
    sessions = Sessions()
    page_token, other_page = sessions.issue_token("page-1"), sessions.issue_token("page-2")
    api_token = "api-client-token-0123456789"
    run_dir, other_dir, api_dir = RunDir(tmp_path), RunDir(tmp_path), RunDir(tmp_path)
    control = FakeControl()
    sessions.begin_run(page_token, run_dir, [control])
    sessions.begin_run(other_page, other_dir, [FakeControl()])
    sessions.begin_run(api_token, api_dir, [FakeControl()])
    old_feed = sessions.open_feed(page_token)
    feed = sessions.open_feed(page_token)
    assert old_feed.closed and not feed.closed and sessions.feed(page_token) is feed
    assert sessions.end_page("page-1") == 1
    assert control.cancelled == 1 and feed.closed and not run_dir.path.exists()
    assert sessions.run(page_token) is None and sessions.feed(page_token) is None
    # Another page's run, and an API client's run (which no page owns), are untouched.
    assert other_dir.path.exists() and api_dir.path.exists() and sessions.run(api_token) is not None
    assert sessions.end_page("never-seen") == 0


def test_models_load_once_per_process_and_14b_reads_fp8_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from app import models

    loads: list[tuple[str, bool]] = []

    def fake_load(
        name: str, *, fp8: bool = False, device: object = None, compile_regions: bool | None = None
    ) -> object:
        assert compile_regions is None  # off ZeroGPU, ISPA_COMPILE decides
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


def test_api_runs_are_swept_sooner_than_page_runs_and_running_ones_never(tmp_path: Path) -> None:
    now = [0.0]
    sessions = Sessions(max_idle_seconds=3600.0, api_keep_seconds=600.0, clock=lambda: now[0])
    page = sessions.issue_token("page")
    sessions.issue_token("idle-page")
    api, live, busy = (f"{name}-token-0123456789" for name in ("api", "live", "busy"))
    dirs = {name: RunDir(tmp_path) for name in (page, api, live, busy)}
    for name in (page, api, live):
        sessions.finish(sessions.begin_run(name, dirs[name], [FakeControl()]), None)
    sessions.begin_run(busy, dirs[busy], [FakeControl()])  # never finished: kept
    now[0] = 590.0
    feed = sessions.open_feed(live)  # recording now: kept however old its last run is
    now[0] = 600.0
    assert sessions.sweep() == 0  # exactly at the API bound: kept
    now[0] = 600.5
    assert sessions.sweep() == 1
    assert sessions.run(api) is None and not dirs[api].path.exists()
    assert all(dirs[name].path.exists() for name in (page, live, busy))
    now[0] = 3600.5  # a page's finished run, and a page token that never ran, last the page bound
    # and a feed open far longer than any recording lasts is closed, its owner then swept like any other
    assert sessions.sweep() == 3 and feed.closed
    assert sessions.run(page) is None and not dirs[page].path.exists()
    assert sessions.owners() == 1  # busy: the page token that never ran is gone too
    assert sessions.run(live) is None and sessions.run(busy) is not None


def test_owner_tokens_are_checked_and_a_run_without_one_is_unreachable() -> None:
    sessions = Sessions()
    first, second = sessions.owner(None), sessions.owner("")
    assert first != second  # each token-less run has its own key, handed to nobody
    with pytest.raises(ValidationError, match="owner token must be 16 to 128"):
        check_token(first)  # no client can name a token-less run's key
    for bad in ("short", "x" * 129, "has space in it 0123", 12345678901234567, True):
        with pytest.raises(ValidationError, match="owner token must be 16 to 128"):
            sessions.owner(bad)
    token = sessions.issue_token("page")
    assert check_token(token) == token and len(token) >= 32
