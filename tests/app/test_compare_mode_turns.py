"""Compare mode's order: the Full run alone until its first video is out, then the two runs in turn; and each
run's video is the one a lone run of the same policy gives."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from app.generation import _take_turns, run_generation
from app.inputs import COMPARE, DEFAULT_COMPARE, EVICT, FULL, ISPA, SALIENCE, WINDOW
from app.models import get_pipeline
from app.sessions import SESSIONS
from app.validation import ValidationError
from tests.fixtures.app_specs import app_spec


def recorded(name: str, started: list[str], chunks: int):
    started.append(name)
    for i in range(chunks):
        yield f"{name}{i}"


def test_the_lead_runs_alone_until_its_video_is_out_then_the_runs_take_turns() -> None:
    started: list[str] = []
    streams = {"a": recorded("a", started, 5), "b": recorded("b", started, 3)}
    handed: list[tuple[str, ...]] = []
    for step in _take_turns(streams, lead_until=lambda: len(handed) == 2):
        handed.append(tuple(step.values()))
        if len(handed) <= 2:
            assert started == ["a"]  # the second run is not even set up while the first leads
    assert handed == [("a0",), ("a1",), ("b0",), ("a2",), ("b1",), ("a3",), ("b2",), ("a4",)]


def test_without_a_lead_the_runs_take_turns_from_the_start() -> None:
    streams = {"a": iter(["a0", "a1"]), "b": iter(["b0", "b1", "b2"])}
    steps = [tuple(s.items())[0] for s in _take_turns(streams, lead_until=lambda: True)]
    assert steps == [("a", "a0"), ("b", "b0"), ("a", "a1"), ("b", "b1"), ("b", "b2")]


def run_once(
    policy: str, examples_dir: Path, speech: Path, session: str, compare: tuple[str, str] = DEFAULT_COMPARE
) -> tuple[dict, dict[str, np.ndarray]]:
    """The final report and the decoded frames of each run's mp4, for one request through the app's loop."""
    pipe = get_pipeline("tiny")
    spec = app_spec(
        pipe, examples_dir, speech, policy=policy, seed=2, compare_a=compare[0], compare_b=compare[1]
    )
    try:
        final = list(run_generation(spec, "tiny", session, live=False))[-1]
        videos = {}
        for path in map(Path, final.downloads):
            if path.suffix == ".mp4":
                with av.open(str(path)) as container:
                    frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
                videos[path.stem.removeprefix("avatar-")] = np.stack(frames)
        return final.report, videos
    finally:
        run = SESSIONS.run(session)
        if run is not None:
            run.run_dir.cleanup()


def test_compare_mode_gives_each_run_the_video_of_a_lone_run(examples_dir: Path, tmp_path: Path) -> None:
    audio, rate = sf.read(examples_dir / "fashion_blogger.wav", dtype="float32")
    speech = tmp_path / "speech.wav"
    sf.write(speech, audio[: round(1.5 * rate)], rate)
    compare_report, compare_videos = run_once(COMPARE, examples_dir, speech, "turns-compare")
    assert set(compare_videos) == {"full", "ispa"}
    for policy in (FULL, ISPA):
        report, videos = run_once(policy, examples_dir, speech, f"turns-{policy}")
        alone = videos[policy.lower()]
        assert len(alone) == sum(c["frames"] for c in report["runs"][policy]["chunks"]) > 0
        np.testing.assert_array_equal(compare_videos[policy.lower()], alone)
        figures = [(c["kv_bytes"], c["l_layers"], c["event"]) for c in report["runs"][policy]["chunks"]]
        in_compare = [
            (c["kv_bytes"], c["l_layers"], c["event"]) for c in compare_report["runs"][policy]["chunks"]
        ]
        assert in_compare == figures


def test_a_vs_b_without_full_adds_a_full_run_and_measures_each_against_it(
    examples_dir: Path, tmp_path: Path
) -> None:
    audio, rate = sf.read(examples_dir / "fashion_blogger.wav", dtype="float32")
    speech = tmp_path / "speech.wav"
    sf.write(speech, audio[: round(1.5 * rate)], rate)
    report, videos = run_once(COMPARE, examples_dir, speech, "turns-a-vs-b", compare=(EVICT, WINDOW))
    assert list(report["runs"]) == [EVICT, WINDOW, FULL] and set(videos) == {"evict", "window", "full"}
    evict, window = (report["runs"][name]["chunks"] for name in (EVICT, WINDOW))
    transition = next(c["index"] for c in evict if c["event"])
    for name, chunks in ((EVICT, evict), (WINDOW, window)):
        drifts = [d for d in report["drift"] if d["run"] == name]
        assert [d["index"] for d in drifts] == [c["index"] for c in chunks]
        # Each run is Full's until its transition (same seed, same inputs), then its own.
        assert [d["identical"] for d in drifts] == [c["index"] <= transition for c in chunks]
        assert all(d["psnr_db"] > 20 and 0 < d["ssim"] < 1 for d in drifts[transition + 1 :])
    for e, w in zip(evict[transition:], window[transition:], strict=True):
        assert abs(e["kv_bytes"] - w["kv_bytes"]) <= 0.1 * e["kv_bytes"]  # equal memory
    assert not np.array_equal(videos["evict"], videos["window"])


def test_compare_choices_are_checked_and_make_their_runs(examples_dir: Path, tmp_path: Path) -> None:
    pipe = get_pipeline("tiny")
    audio, rate = sf.read(examples_dir / "fashion_blogger.wav", dtype="float32")
    speech = tmp_path / "speech.wav"
    sf.write(speech, audio[: round(0.5 * rate)], rate)

    def spec(mode: str, a, b):
        return app_spec(pipe, examples_dir, speech, policy=mode, seed=2, compare_a=a, compare_b=b)

    assert [name for name, _ in spec(COMPARE, FULL, ISPA).policies()] == [FULL, ISPA]
    runs = spec(COMPARE, SALIENCE, FULL).policies()
    assert [(name, policy.name) for name, policy in runs] == [(SALIENCE, "salience"), (FULL, "full")]
    assert [name for name, _ in spec(COMPARE, WINDOW, SALIENCE).policies()] == [WINDOW, SALIENCE, FULL]
    assert [name for name, _ in spec(ISPA, WINDOW, WINDOW).policies()] == [
        ISPA
    ]  # only compare mode uses them
    with pytest.raises(ValidationError, match="Compare A and Compare B must be two different policies"):
        spec(COMPARE, WINDOW, WINDOW)
    with pytest.raises(ValidationError, match="Compare B must be one of: Full, ISPA, Evict"):
        spec(COMPARE, FULL, "Turbo")


def test_compare_mode_shows_its_choices_and_names_the_players() -> None:
    from app.main import name_players, show_mode

    choice_a, choice_b, player_a, player_b, drift = show_mode(COMPARE, WINDOW, SALIENCE)
    assert choice_a.visible and choice_b.visible and player_b.visible and drift.visible
    assert (player_a.label, player_b.label) == (WINDOW, SALIENCE)
    assert [p.label for p in name_players(COMPARE, EVICT, FULL)] == [EVICT, FULL]
    choice_a, choice_b, player_a, player_b, drift = show_mode(ISPA, WINDOW, SALIENCE)
    assert not (choice_a.visible or choice_b.visible or player_b.visible or drift.visible)
    assert player_a.label == "Video"
