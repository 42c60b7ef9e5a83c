"""Decoding block k alongside the DiT of block k+1 (`LiveAvatarPipeline.overlap_decode`), forced on for the CPU: the
same chunks as sequential decoding, the same cancel and recalibration behaviour, and nothing left behind on close."""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import pytest
import torch

from avatars.base import GenerationRequest, RunControl
from avatars.liveavatar import pipeline as pipeline_module
from avatars.liveavatar.encoders.vae import MOTION_LATENT_FRAMES, StreamingDecoder
from avatars.liveavatar.loading import build_tiny_pipeline
from avatars.liveavatar.portrait_latents import PortraitLatentCache
from avatars.liveavatar.streaming.local import LocalDownstream
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


class _FakeStream:
    """Stands in for a `torch.cuda.Stream`: remembers what it was told to wait for."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.waited_for: list[_FakeStream] = []

    def wait_stream(self, other: _FakeStream) -> None:
        self.waited_for.append(other)


class _CudaLooking:
    """The run's decoder as `LocalDownstream` sees it on a GPU (it picks a stream by device); it decodes on the
    CPU."""

    device = torch.device("cuda", 0)

    def __init__(self, decoder) -> None:
        self._decoder = decoder

    def __getattr__(self, name):
        return getattr(self._decoder, name)


def test_a_restored_decoder_cache_is_recorded_on_the_decode_stream_before_it_is_read(pipe, monkeypatch):
    """CUDA streams emulated on the CPU, with the overlap on and two runs on one portrait: every tensor of the cache
    each run starts from (warmed up; restored from the first run's warm-up) is `record_stream`ed onto that run's
    decode stream, which has waited for the loop's stream, before a decode reads it; the frames are unchanged."""
    request = _request(1.0)
    alone = _chunks(pipe, False, request)
    default = _FakeStream("default")
    current = threading.local()
    streams: list[_FakeStream] = []
    recorded: dict[int, list[_FakeStream]] = {}  # id of a tensor → streams it was recorded on
    restored: list[list[int]] = []  # the tensors of each restored state
    first_reads: list[tuple[_FakeStream, list[int], list[_FakeStream]]] = []

    def new_stream(device):
        assert device == _CudaLooking.device
        streams.append(_FakeStream(f"decode {len(streams)}"))
        return streams[-1]

    @contextlib.contextmanager
    def use_stream(stream):
        previous = getattr(current, "stream", default)
        current.stream = stream
        try:
            yield
        finally:
            current.stream = previous

    def record_stream(tensor, stream):
        recorded.setdefault(id(tensor), []).append(stream)

    original_restore, original_decode = StreamingDecoder.restore, StreamingDecoder.decode_block

    def restore(self, state):
        restored.append([id(t) for t in state.cache if isinstance(t, torch.Tensor)])
        return original_restore(self, state)

    def decode_block(self, latents):
        stream = getattr(current, "stream", default)
        if stream is not default and self.latent_frames_done == MOTION_LATENT_FRAMES:  # a run's first block
            cache = [id(t) for t in self._cache if isinstance(t, torch.Tensor)]
            first_reads.append((stream, cache, list(stream.waited_for)))
            for tensor in cache:  # recorded on the stream that reads them, before this read
                assert stream in recorded.get(tensor, []), stream.name
        return original_decode(self, latents)

    monkeypatch.setattr(torch.cuda, "Stream", new_stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: getattr(current, "stream", default))
    monkeypatch.setattr(torch.cuda, "stream", use_stream)
    monkeypatch.setattr(torch.Tensor, "record_stream", record_stream)
    monkeypatch.setattr(StreamingDecoder, "restore", restore)
    monkeypatch.setattr(StreamingDecoder, "decode_block", decode_block)
    monkeypatch.setattr(
        pipeline_module, "LocalDownstream", lambda d, *a, **k: LocalDownstream(_CudaLooking(d), *a, **k)
    )
    monkeypatch.setattr(pipe, "portrait_latents", PortraitLatentCache(pipe.vae))  # nothing warmed yet
    pipe.overlap_decode = True
    try:
        first = pipe.stream(request)
        head = next(first)  # the first run warms up and keeps a copy of its warmed decoder
        second = list(pipe.stream(request))
        first_chunks = [head, *first]
    finally:
        pipe.overlap_decode = None
    assert len(streams) == 2 and len(restored) == 1 and restored[0]
    assert [stream for stream, _, _ in first_reads] == streams  # each run's first block, on its own stream
    assert set(first_reads[1][1]) == set(
        restored[0]
    )  # the second run's first decode reads the restored cache
    for _, _, waited in first_reads:
        assert default in waited  # ordered after the loop's stream (the warm-up, the restore, the DiT)
    for chunks in (first_chunks, second):
        assert len(chunks) == len(alone)
        for a, b in zip(alone, chunks, strict=True):
            assert np.array_equal(a.frames, b.frames)
