"""Stream segments and the whole-run mp4, decoded back with PyAV."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest

import avatars.media.mp4 as encoders
from app.media import RunDir, SegmentBuffer, write_segment
from avatars.base import AvatarChunk
from avatars.media.run_video import RunVideoWriter, check_piece
from tests.fixtures.chunk_reports import full_policy_report

FPS = 25.0
SR = 16_000
AAC_FRAME = 1024


def make_chunk(index: int, n_frames: int, height: int = 48, width: int = 64, seed: int = 0) -> AvatarChunk:
    """Noise frames (so an encoder with scene-cut detection would insert keyframes) and a sine's audio slice."""
    rng = np.random.default_rng(seed + index)
    frames = rng.integers(0, 256, (n_frames, height, width, 3), dtype=np.uint8)
    n_samples = round(n_frames / FPS * SR)
    t = np.arange(n_samples) / SR + index
    audio = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    report = full_policy_report(index, n_frames, end_seconds=(index + 1) * n_frames / FPS)
    return AvatarChunk(index=index, frames=frames, audio=audio, sample_rate=SR, fps=FPS, report=report)


@dataclass
class Decoded:
    video_codec: str
    pix_fmt: str
    width: int
    height: int
    video_seconds: float
    keyframes: list[bool]
    frames: np.ndarray
    audio_codec: str
    audio_seconds: float  # from the container (edit list), not the decoded sample count
    audio_samples: int


def decode(path: Path) -> Decoded:
    with av.open(str(path)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        video_codec, pix_fmt = video.codec_context.name, video.codec_context.pix_fmt
        width, height = video.codec_context.width, video.codec_context.height
        video_seconds = float(video.duration * video.time_base)
        audio_codec, audio_seconds = audio.codec_context.name, float(audio.duration * audio.time_base)
        decoded = list(container.decode(video=0))
    with av.open(str(path)) as container:
        audio_samples = sum(frame.samples for frame in container.decode(audio=0))
    return Decoded(
        video_codec=video_codec,
        pix_fmt=pix_fmt,
        width=width,
        height=height,
        video_seconds=video_seconds,
        keyframes=[frame.key_frame for frame in decoded],
        frames=np.stack([frame.to_ndarray(format="rgb24") for frame in decoded]),
        audio_codec=audio_codec,
        audio_seconds=audio_seconds,
        audio_samples=audio_samples,
    )


def assert_playable_segment(path: Path, n_frames: int, height: int, width: int) -> Decoded:
    got = decode(path)
    assert (got.video_codec, got.pix_fmt) == ("h264", "yuv420p")
    assert (got.height, got.width) == (height, width)
    assert len(got.frames) == n_frames
    assert got.keyframes[0] and not any(got.keyframes[1:]), "one GOP per segment, first frame the keyframe"
    assert got.video_seconds == pytest.approx(n_frames / FPS, abs=1e-6)
    assert got.audio_codec == "aac"
    assert abs(got.audio_seconds - n_frames / FPS) <= AAC_FRAME / SR
    expected_samples = round(n_frames / FPS * SR)
    assert expected_samples <= got.audio_samples < expected_samples + AAC_FRAME
    return got


@pytest.mark.parametrize("n_frames", [9, 12])
def test_single_chunk_segment_is_playable_h264_aac(n_frames: int) -> None:
    with RunDir() as run_dir:
        path = write_segment(make_chunk(0, n_frames), run_dir)
        assert path.parent == run_dir.path and path.suffix == ".mp4"
        assert_playable_segment(path, n_frames, 48, 64)


def striped_chunk(height: int, width: int) -> AvatarChunk:
    """Red, green and blue vertical stripes: smooth enough to survive encoding almost unchanged."""
    frames = np.zeros((12, height, width, 3), dtype=np.uint8)
    third = width // 3
    frames[:, :, :third, 0] = 220
    frames[:, :, third : 2 * third, 1] = 220
    frames[:, :, 2 * third :, 2] = 220
    audio = np.zeros(round(12 / FPS * SR), dtype=np.float32)
    report = full_policy_report(0, len(frames), end_seconds=len(frames) / FPS)
    return AvatarChunk(index=0, frames=frames, audio=audio, sample_rate=SR, fps=FPS, report=report)


def test_segment_keeps_picture_and_colours() -> None:
    """The stripes decode to the same stripes (no channel swap, no flip)."""
    chunk = striped_chunk(48, 96)
    with RunDir() as run_dir:
        got = decode(write_segment(chunk, run_dir))
    assert np.abs(got.frames.astype(int) - chunk.frames.astype(int)).mean() < 4.0


def test_odd_frame_size_is_padded_to_even_by_repeating_the_edge() -> None:
    chunk = striped_chunk(47, 63)
    with RunDir() as run_dir:
        got = assert_playable_segment(write_segment(chunk, run_dir), 12, 48, 64)
    assert np.abs(got.frames[:, :47, :63].astype(int) - chunk.frames.astype(int)).mean() < 4.0
    blue = got.frames[:, :, 63].astype(int)  # the added column repeats the blue last column
    assert blue[..., 2].mean() > 200 and blue[..., :2].mean() < 20


def test_segment_buffer_groups_liveavatar_blocks_into_one_second_segments() -> None:
    """LiveAvatar's 9, 12, 12, ... frame blocks become 33, 36, ... frame segments, with the rest flushed."""
    chunks = [make_chunk(0, 9)] + [make_chunk(i, 12) for i in range(1, 7)]
    buffer = SegmentBuffer(min_seconds=1.0)
    segments = [seg for c in chunks if (seg := buffer.push(c)) is not None]
    tail = buffer.flush()
    assert tail is not None and buffer.flush() is None
    segments.append(tail)

    assert [s.chunk_indices for s in segments] == [(0, 1, 2), (3, 4, 5), (6,)]
    assert [len(s.frames) for s in segments] == [33, 36, 12]
    for seg in segments:
        members = [chunks[i] for i in seg.chunk_indices]
        np.testing.assert_array_equal(seg.frames, np.concatenate([c.frames for c in members]))
        np.testing.assert_array_equal(seg.audio, np.concatenate([c.audio for c in members]))
        assert seg.seconds == pytest.approx(len(seg.frames) / FPS)
    with RunDir() as run_dir:
        for seg in segments:
            assert_playable_segment(write_segment(seg, run_dir), len(seg.frames), 48, 64)


def test_segment_buffer_target_is_configurable() -> None:
    buffer = SegmentBuffer(min_seconds=2.0)
    sizes = [len(seg.frames) for i in range(10) if (seg := buffer.push(make_chunk(i, 12))) is not None]
    assert sizes == [60, 60]  # 50 frames needed: five 12-frame blocks each
    exact = SegmentBuffer(min_seconds=0.96)  # two 12-frame blocks reach it exactly
    assert [len(seg.frames) for i in range(4) if (seg := exact.push(make_chunk(i, 12))) is not None] == [
        24,
        24,
    ]
    with pytest.raises(ValueError, match="positive"):
        SegmentBuffer(min_seconds=0)


def test_segment_buffer_rejects_mismatched_chunks() -> None:
    buffer = SegmentBuffer()
    buffer.push(make_chunk(0, 9))
    with pytest.raises(ValueError, match="share fps, sample rate and frame size"):
        buffer.push(make_chunk(1, 12, height=32))
    short_audio = make_chunk(2, 12)
    short_audio.audio = short_audio.audio[:-5]
    with pytest.raises(ValueError, match="need 7680.0 audio samples"):
        buffer.push(short_audio)


def test_check_piece_rejects_bad_frames() -> None:
    chunk = make_chunk(0, 12)
    chunk.frames = chunk.frames.astype(np.float32)
    with pytest.raises(ValueError, match="uint8"):
        check_piece(chunk, max_audio_error_samples=1)


def test_run_video_is_written_incrementally_and_holds_everything(tmp_path: Path) -> None:
    chunks = [make_chunk(0, 9, 96, 128)] + [make_chunk(i, 12, 96, 128) for i in range(1, 21)]
    path = tmp_path / "run.mp4"
    writer = RunVideoWriter(path)
    for chunk in chunks:
        writer.add(chunk)
    on_disk_before_close = path.stat().st_size
    assert writer.close() == path
    # Encoded data reaches the file as chunks arrive (the muxer buffers only a few hundred KiB), so the
    # writer cannot be holding the run's frames until the end.
    assert on_disk_before_close >= 0.5 * path.stat().st_size
    n_frames = sum(len(c.frames) for c in chunks)
    got = decode(path)
    assert (got.video_codec, got.pix_fmt, len(got.frames)) == ("h264", "yuv420p", n_frames)
    assert [i for i, key in enumerate(got.keyframes) if key] == [0, 50, 100, 150, 200]  # a 2 s GOP
    assert got.video_seconds == pytest.approx(n_frames / FPS, abs=1e-6)
    assert abs(got.audio_seconds - n_frames / FPS) <= AAC_FRAME / SR
    expected_samples = round(n_frames / FPS * SR)
    assert expected_samples <= got.audio_samples < expected_samples + AAC_FRAME
    with pytest.raises(ValueError, match="already closed"):
        writer.add(chunks[0])


def test_run_video_rejects_a_size_change_and_discards(tmp_path: Path) -> None:
    path = tmp_path / "run.mp4"
    writer = RunVideoWriter(path)
    writer.add(make_chunk(0, 9))
    with pytest.raises(ValueError, match="share fps, sample rate and frame size"):
        writer.add(make_chunk(1, 12, height=64))
    writer.discard()
    assert not path.exists()
    assert RunVideoWriter(tmp_path / "empty.mp4").close() is None


@pytest.fixture
def ffmpeg_program_encoder(monkeypatch: pytest.MonkeyPatch) -> encoders.H264Encoder:
    """Force the fallback path: the ffmpeg program bundled with imageio-ffmpeg."""
    import imageio_ffmpeg

    encoder = encoders.H264Encoder("ffmpeg", "libx264", imageio_ffmpeg.get_ffmpeg_exe())
    monkeypatch.setattr(encoders, "choose_h264_encoder", lambda: encoder)
    return encoder


def test_ffmpeg_program_fallback_writes_the_same_kind_of_segment(ffmpeg_program_encoder: object) -> None:
    with RunDir() as run_dir:
        path = write_segment(make_chunk(0, 12), run_dir)
        assert_playable_segment(path, 12, 48, 64)
        assert sorted(p.name for p in run_dir.path.iterdir()) == [path.name], "temporaries left behind"


def test_ffmpeg_program_fallback_run_video(ffmpeg_program_encoder: object, tmp_path: Path) -> None:
    chunks = [make_chunk(0, 9)] + [make_chunk(i, 12) for i in range(1, 4)]
    writer = RunVideoWriter(tmp_path / "run.mp4")
    for chunk in chunks:
        writer.add(chunk)
    got = decode(writer.close())
    assert len(got.frames) == 45 and got.video_codec == "h264"
    assert abs(got.audio_seconds - 45 / FPS) <= AAC_FRAME / SR


def test_encoder_choice_prefers_pyav_then_the_ffmpeg_program(monkeypatch: pytest.MonkeyPatch) -> None:
    encoders.choose_h264_encoder.cache_clear()
    try:
        if "libx264" in av.codecs_available:
            assert encoders.choose_h264_encoder() == encoders.H264Encoder("pyav", "libx264")
        encoders.choose_h264_encoder.cache_clear()
        monkeypatch.setattr(encoders, "_pyav_has_encoder", lambda name: False)
        chosen = encoders.choose_h264_encoder()
        assert chosen.kind == "ffmpeg" and chosen.executable and os.access(chosen.executable, os.X_OK)
    finally:
        encoders.choose_h264_encoder.cache_clear()


def test_writer_refuses_odd_dimensions(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even dimensions"):
        encoders.open_mp4_writer(
            tmp_path / "x.mp4", width=63, height=48, fps=FPS, sample_rate=SR, gop_frames=12
        )
