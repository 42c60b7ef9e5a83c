"""Decoding block k alongside the DiT of block k+1 (`LiveAvatarPipeline.overlap_decode`), forced on for the CPU: the
same chunks as sequential decoding, the same cancel and recalibration behaviour, and nothing left behind on close."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from avatars.base import GenerationRequest, RunControl
from avatars.liveavatar.loading import build_tiny_pipeline
from ispa import ISPAPolicy

AREA = 64 * 64


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(seed=0)


def _request(seconds: float) -> GenerationRequest:
    rng = np.random.default_rng(0)
    t = np.arange(round(seconds * 16000)) / 16000
    audio = (0.2 * np.sin(2 * np.pi * 140 * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
    portrait = rng.integers(0, 256, size=(96, 80, 3), dtype=np.uint8)
    return GenerationRequest(
        portrait=portrait,
        audio=audio,
        sample_rate=16000,
        seed=1,
        policy=ISPAPolicy(t_warm=6),
        max_area=AREA,
    )


def _chunks(
    pipe, overlap: bool, request: GenerationRequest, control: RunControl | None = None, on_chunk=None
):
    pipe.overlap_decode = overlap
    try:
        chunks = []
        for chunk in pipe.stream(request, control):
            chunks.append(chunk)
            if on_chunk is not None:
                on_chunk(chunk, chunks)
        return chunks
    finally:
        pipe.overlap_decode = None


def test_overlapped_decoding_gives_the_same_chunks(pipe):
    request = _request(1.5)  # 4 blocks, the last one cut where the speech ends; absorb after block 1
    sequential = _chunks(pipe, False, request)
    overlapped = _chunks(pipe, True, request)
    assert len(sequential) == len(overlapped) == 4
    assert [c.report.engine.event for c in sequential][1] == "absorbed"
    for a, b in zip(sequential, overlapped, strict=True):
        assert (a.index, a.report.frames, a.report.end_seconds) == (
            b.index,
            b.report.frames,
            b.report.end_seconds,
        )
        assert np.array_equal(a.frames, b.frames)
        assert np.array_equal(a.audio, b.audio)
        assert a.report.engine.phase == b.report.engine.phase
        assert a.report.timings.decode_hidden_seconds == 0.0  # sequential: nothing runs alongside
        assert 0.0 <= b.report.timings.decode_hidden_seconds <= b.report.timings.decode_seconds


def test_cancel_and_recalibration_behave_as_without_overlap(pipe):
    """The same requests and outcomes as tests/avatars/test_pipeline_stream.py's sequential test."""
    control = RunControl()

    def react(chunk, chunks):
        if chunk.report.engine.event == "absorbed":
            control.request_recalibration()
        if len(chunks) == 4:
            control.cancel()

    chunks = _chunks(pipe, True, _request(3.0), control, react)
    assert len(chunks) == 4
    assert chunks[2].report.engine.event == "recalibration_started"
    assert chunks[3].report.engine.phase == "recalibrating"


def test_closing_the_stream_mid_run_stops_the_decode_thread(pipe):
    pipe.overlap_decode = True
    try:
        stream = pipe.stream(_request(3.0))
        next(stream)
        assert any(t.name.startswith("vae-decode") for t in threading.enumerate())
        stream.close()
    finally:
        pipe.overlap_decode = None
    assert not any(t.name.startswith("vae-decode") for t in threading.enumerate())
