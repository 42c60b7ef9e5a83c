"""Live mode through the app's own handlers (as the microphone's events call them): video comes out while the
speech is still arriving, every chunk gets a measured speech-to-video delay, and the result is the same as
generating from the finished recording."""

from __future__ import annotations

import threading
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import soundfile as sf

from app import main
from app.layout import RunOutputs

SMALL = "64×64 area"
STATUS = RunOutputs.position("status")


# What a run's reports show whatever the audio features: live features come from the streaming encoder and a
# recording's from one whole-clip pass (README, "Fidelity"), so statistics such as ε may differ, the schedule not.
SCHEDULE_KEYS = (
    "index",
    "phase",
    "event",
    "frames",
    "t_seconds",
    "kv_bytes_full_ring",
    "kv_bytes_full_unbounded",
)


def engine_view(report: dict) -> list[dict]:
    """The chunk reports' schedule: which block, which phase, how many frames and which KV sizes."""
    chunks = report["runs"]["ISPA"]["chunks"]
    return [{k: c[k] for k in SCHEDULE_KEYS} | {"local_layers": len(c["l_layers"])} for c in chunks]


def test_live_run_streams_while_speech_arrives_and_matches_the_offline_run(
    examples_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    audio, rate = sf.read(examples_dir / "fashion_blogger.wav", dtype="float32")
    audio = audio[: 3 * rate]
    piece = rate // 4  # the browser sends a piece every 0.25 s
    pieces = [audio[i : i + piece] for i in range(0, len(audio), piece)]
    portrait = str(examples_dir / "fashion_blogger.jpg")
    settings = ("ISPA", 0.5, 6, 1, "tiny", 1e-3, SMALL)
    request = gr.Request(session_hash="live-session")
    token = main.issue_owner_token(request)  # what the page's load event hands it

    main.open_live_feed(token, request)
    feed = main.SESSIONS.feed(token)
    for p in pieces[:6]:  # the first 1.5 s of speech is in before generation starts
        main.push_live_audio((rate, p), token, request)

    two_chunks_out = threading.Event()

    def speak_the_rest() -> None:
        two_chunks_out.wait(timeout=300)  # a guard against a hang; the assertion below catches that case
        for p in pieces[6:]:
            main.push_live_audio((rate, p), token, request)
        main.close_live_feed(token, request)

    speaker = threading.Thread(target=speak_the_rest)
    speaker.start()
    outputs = []
    still_speaking_after_two_chunks = None
    for out in main.generate_live(portrait, "", *settings, owner_token=token, request=request):
        outputs.append(out)
        if len(outputs) == 2:
            still_speaking_after_two_chunks = not feed.closed
            two_chunks_out.set()
    speaker.join()
    assert still_speaking_after_two_chunks, "live mode waited for the end of the speech"

    live = outputs[-1][-1]
    chunks = live["runs"]["ISPA"]["chunks"]
    delay = live["speech_to_video_delay"]
    assert delay["chunks"] == len(chunks) >= 5
    assert 0 <= delay["latest_s"] <= delay["max_s"] and delay["mean_s"] <= delay["max_s"]
    assert "Speech → video delay" in outputs[-1][STATUS]
    assert main.SESSIONS.run(token).finished.is_set()

    # The same speech as one file: the engine follows the same schedule.
    recording = tmp_path / "recording.wav"
    sf.write(recording, audio, rate, subtype="FLOAT")
    offline_request = gr.Request(session_hash="offline-session")
    offline_token = main.issue_owner_token(offline_request)
    offline_run = main.generate(
        portrait, str(recording), "", "", *settings, owner_token=offline_token, request=offline_request
    )
    offline = list(offline_run)[-1][-1]
    assert engine_view(live) == engine_view(offline)
    assert live["runs"]["ISPA"]["video_seconds"] == offline["runs"]["ISPA"]["video_seconds"]
    assert offline["speech_to_video_delay"] is None
    main.SESSIONS.end_page("live-session")
    main.SESSIONS.end_page("offline-session")
    assert not any(Path(main.temp_root()).glob("ispa-run-*"))


def test_stop_ends_a_live_run_that_waits_for_speech(
    examples_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stop closes the feed, so a run blocked on the microphone ends and hands over what exists."""
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    audio, rate = sf.read(examples_dir / "fashion_blogger.wav", dtype="float32")
    request = gr.Request(session_hash="stop-session")
    token = main.issue_owner_token(request)
    main.open_live_feed(token, request)
    main.push_live_audio((rate, np.ascontiguousarray(audio[:rate])), token, request)
    portrait = str(examples_dir / "fashion_blogger.jpg")
    stream = main.generate_live(
        portrait, "", "Full", 0.5, 6, 1, "tiny", 1e-3, SMALL, owner_token=token, request=request
    )
    first = next(out for out in stream if isinstance(out[STATUS], str))  # the first block; it waits for more
    assert first[STATUS].startswith("**")
    handed_over: list = []
    stopper = threading.Thread(target=lambda: handed_over.append(main.stop_run(token, request)))
    stopper.start()
    rest = list(stream)  # ends once Stop has closed the feed
    stopper.join()
    files, report = handed_over[0]
    assert report["stopped_early"] and "stopped" in rest[-1][STATUS]
    assert {Path(f).name for f in files} == {"avatar-full.mp4", "report.json"}
    # One update per chunk after the first, one handing over the last segment when one is left, then the final one.
    assert len(rest) - len(report["runs"]["Full"]["chunks"]) in (0, 1)
    main.SESSIONS.end_page("stop-session")
