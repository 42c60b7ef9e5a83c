"""Without ffmpeg/ffprobe Gradio cannot stream video: the app says so, builds ordinary players, and hands them
each run's finished mp4 at the end instead of segments on the way."""

from __future__ import annotations

from pathlib import Path

import av
import gradio as gr
import pytest
import soundfile as sf

from app import generation, main
from app.media import FfmpegStatus

MISSING = FfmpegStatus(
    ffmpeg=False, ffprobe=True, message="Streaming video needs ffmpeg and ffprobe on PATH."
)


def frames_in(path: str) -> int:
    with av.open(path) as container:
        return sum(1 for _ in container.decode(video=0))


def test_without_ffmpeg_players_get_the_finished_videos(
    examples_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setattr(generation, "ffmpeg_status", lambda: MISSING)
    monkeypatch.setattr(main, "ffmpeg_status", lambda: MISSING)

    demo = main.build_demo()
    by_id = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert not by_id["player_a"].streaming and not by_id["player_b"].streaming
    assert "No live video stream" in by_id["banner"].value

    audio, rate = sf.read(examples_dir / "fashion_blogger.wav", dtype="float32")
    speech = tmp_path / "speech.wav"
    sf.write(speech, audio[:rate], rate)
    request = gr.Request(session_hash="no-ffmpeg")
    token = main.issue_owner_token(request)
    settings = ("Compare", 0.5, 6, 1, "tiny", 1e-3, "64×64 area")
    portrait = str(examples_dir / "fashion_blogger.jpg")
    outputs = list(
        main.generate(portrait, str(speech), "", "", *settings, owner_token=token, request=request)
    )

    assert all(out[0] == gr.skip() and out[1] == gr.skip() for out in outputs[:-1])  # nothing to play yet
    final = outputs[-1]
    report = final[-1]
    assert [Path(final[0]).name, Path(final[1]).name] == ["avatar-full.mp4", "avatar-ispa.mp4"]
    assert [Path(p).name for p in final[-2]] == ["avatar-full.mp4", "avatar-ispa.mp4", "report.json"]
    for player, run in ((final[0], "Full"), (final[1], "ISPA")):
        assert frames_in(player) == sum(c["frames"] for c in report["runs"][run]["chunks"])
    main.SESSIONS.end_page("no-ffmpeg")
