"""The streaming loop on the tiny model: frame and sample counts, Full/ISPA equivalence and memory, audio features."""

from __future__ import annotations

from dataclasses import replace

import librosa
import numpy as np
import pytest
import torch

from avatars.base import GenerationRequest, RunControl
from avatars.liveavatar.block_layout import DROPPED_FIRST_FRAMES, FPS
from avatars.liveavatar.encoders.audio import (
    SAMPLE_RATE,
    AudioEncoder,
    num_video_frames,
    official_frame_features,
)
from avatars.liveavatar.encoders.vae import MOTION_LATENT_FRAMES, StreamingDecoder
from avatars.liveavatar.loading import build_tiny_pipeline
from avatars.liveavatar.portrait_latents import PortraitLatents
from avatars.liveavatar.schedule import DenoisingSchedule
from avatars.liveavatar.streaming.audio_timeline import AudioTimeline
from avatars.liveavatar.streaming.stage import DenoisingStage
from ispa import AttentionSession, FullPolicy, ISPAPolicy

# Per-second mean relative error of live features against the whole-clip ones: this tiny random wav2vec2 showed
# at most 0.64 on 4-s clips (bench/live_audio_fidelity.py sizes it for a larger random model).
LIVE_FEATURE_BOUND = 0.7


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def portrait():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(180, 100, 3), dtype=np.uint8)


def speech(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    """A voiced-sounding signal: harmonics with a syllable-rate envelope plus a little noise."""
    t = np.arange(round(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    voice = sum(np.sin(2 * np.pi * f * t) / (i + 1) for i, f in enumerate((140, 280, 420, 560)))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)
    return (0.2 * voice * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def expected_frames(pipe, audio: np.ndarray, rate: int) -> int:
    """Video frames the model's timeline has for this audio (the official count), minus the 3 dropped."""
    resampled = round(audio.size * SAMPLE_RATE / rate)
    steps_50hz = pipe.audio_encoder.num_steps(resampled)
    return num_video_frames(int(steps_50hz / 50 * 30)) - DROPPED_FIRST_FRAMES


def run(pipe, portrait, audio, rate, policy, seed=3, **settings):
    request = GenerationRequest(
        portrait=portrait,
        audio=audio,
        sample_rate=rate,
        prompt="a person speaks",
        seed=seed,
        policy=policy,
        **settings,
    )
    return list(pipe.stream(request))


@pytest.mark.parametrize("rate", [16000, 24000, 44100])
def test_frames_and_audio_samples_match_the_audio_length(pipe, portrait, rate):
    audio = speech(2.3, rate)
    chunks = run(pipe, portrait, audio, rate, FullPolicy())
    frames = sum(len(c.frames) for c in chunks)
    assert frames == expected_frames(pipe, audio, rate)
    assert [len(c.frames) for c in chunks][:2] == [12 - DROPPED_FIRST_FRAMES, 12]
    for c in chunks:
        assert c.fps == FPS and c.sample_rate == rate
        assert c.frames.dtype == np.uint8 and c.frames.shape[1:] == chunks[0].frames.shape[1:]
        assert abs(len(c.audio) - len(c.frames) / FPS * rate) <= 1
    played = np.concatenate([c.audio for c in chunks])
    assert len(played) == round(frames / FPS * rate)
    # The played audio is the input from the first kept frame on: frame k plays with time k / fps.
    start = round(DROPPED_FIRST_FRAMES * rate / FPS)
    np.testing.assert_array_equal(played, audio[start : start + len(played)])


def test_ispa_matches_full_before_absorbing_then_holds_less(pipe, portrait):
    audio = speech(2.5, 16000)
    full = run(pipe, portrait, audio, 16000, FullPolicy())
    ispa = run(pipe, portrait, audio, 16000, ISPAPolicy(k_fraction=0.5, t_warm=6))
    absorbed_at = next(i for i, c in enumerate(ispa) if c.report.engine.event == "absorbed")
    assert absorbed_at == 1  # t_warm = 6 latent frames = 2 blocks
    for a, b in zip(full[: absorbed_at + 1], ispa[: absorbed_at + 1], strict=True):
        assert np.array_equal(a.frames, b.frames)
    assert not np.array_equal(full[-1].frames, ispa[-1].frames)

    after = ispa[absorbed_at].report.engine
    local = after.l_layers
    assert len(local) == 2  # round(0.5 · 4)
    per_layer_full = full[absorbed_at].report.engine.kv_bytes_per_layer
    height, width = full[0].frames.shape[1:3]
    sink_tokens = pipe.dit.sink_token_count(height // 8, width // 8)
    sink_only = sink_tokens * pipe.dit.config.dim * 2 * 4  # keys and values, fp32: all a local layer keeps
    expected = sum(sink_only if i in local else b for i, b in enumerate(per_layer_full))
    assert after.kv_bytes == expected < full[absorbed_at].report.engine.kv_bytes
    assert after.kv_bytes_full_ring == full[absorbed_at].report.engine.kv_bytes


def test_full_and_ispa_interleaved_on_one_pipeline_equal_separate_runs(pipe, portrait):
    audio = speech(1.6, 16000)
    alone = [run(pipe, portrait, audio, 16000, p) for p in (FullPolicy(), ISPAPolicy(t_warm=6))]
    request = GenerationRequest(
        portrait=portrait, audio=audio, sample_rate=16000, prompt="a person speaks", seed=3
    )
    streams = [pipe.stream(replace(request, policy=p)) for p in (FullPolicy(), ISPAPolicy(t_warm=6))]
    together = [[], []]
    for pair in zip(*streams, strict=True):
        for i, chunk in enumerate(pair):
            together[i].append(chunk)
    for ours, reference in zip(together, alone, strict=True):
        assert [c.index for c in ours] == [c.index for c in reference]
        for a, b in zip(ours, reference, strict=True):
            assert np.array_equal(a.frames, b.frames)


def _timeline_features(timeline: AudioTimeline) -> torch.Tensor:
    """The features a run would get, without the zero padding of the last block."""
    return torch.cat([features[:valid] for features, valid in timeline.feature_blocks()])


def test_whole_audio_gets_the_official_features_exactly(pipe):
    rate = 24000
    audio = speech(2.9, rate)
    features = _timeline_features(AudioTimeline(audio, rate, pipe.audio_encoder))
    encoder: AudioEncoder = pipe.audio_encoder
    # The official pipeline loads its audio with librosa at 16 kHz, then runs wav2vec2 on the whole clip.
    official = official_frame_features(
        encoder.hidden_states(librosa.resample(audio, orig_sr=rate, target_sr=16000))
    )
    assert torch.equal(features, official)


def test_live_features_stay_within_the_measured_bound_of_the_whole_clip(pipe):
    rate = 48000
    audio = speech(4.0, rate)
    whole = _timeline_features(AudioTimeline(audio, rate, pipe.audio_encoder))
    cuts = np.sort(np.random.default_rng(1).integers(1, audio.size, size=9))
    live = _timeline_features(AudioTimeline(iter(np.split(audio, cuts)), rate, pipe.audio_encoder))
    assert live.shape == whole.shape
    per_frame = (live - whole).flatten(1).norm(dim=1) / whole.flatten(1).norm(dim=1)
    per_second = [float(s.mean()) for s in per_frame.split(FPS)]
    assert max(per_second) <= LIVE_FEATURE_BOUND
    assert float((live - whole).norm() / whole.norm()) <= 0.5  # measured 0.39 (0.71 without the read offset)
    # Another cut of the same audio gives bit-identical live features.
    other = _timeline_features(AudioTimeline(iter(np.array_split(audio, 3)), rate, pipe.audio_encoder))
    assert torch.equal(other, live)


def test_live_pieces_give_the_same_frames_and_samples_as_the_whole_file(pipe, portrait):
    audio = speech(1.7, 48000)
    whole = run(pipe, portrait, audio, 48000, ISPAPolicy(t_warm=6))
    cuts = np.sort(np.random.default_rng(1).integers(1, audio.size, size=9))
    live = run(pipe, portrait, iter(np.split(audio, cuts)), 48000, ISPAPolicy(t_warm=6))
    assert [c.index for c in live] == [c.index for c in whole]
    for a, b in zip(live, whole, strict=True):
        assert a.frames.shape == b.frames.shape
        assert np.array_equal(a.audio, b.audio)


def test_seed_changes_the_video_and_is_reproducible(pipe, portrait):
    audio = speech(1.0, 16000)
    a, b, c = (run(pipe, portrait, audio, 16000, FullPolicy(), seed=s) for s in (5, 5, 6))
    assert np.array_equal(a[0].frames, b[0].frames)
    assert not np.array_equal(a[0].frames, c[0].frames)


def test_cancel_and_recalibration_are_honoured_between_blocks(pipe, portrait):
    audio = speech(3.0, 16000)
    control = RunControl()
    request = GenerationRequest(
        portrait=portrait, audio=audio, sample_rate=16000, seed=0, policy=ISPAPolicy(t_warm=6)
    )
    chunks = []
    for chunk in pipe.stream(request, control):
        chunks.append(chunk)
        if chunk.report.engine.event == "absorbed":
            control.request_recalibration()
        if len(chunks) == 4:
            control.cancel()
    assert len(chunks) == 4
    assert chunks[2].report.engine.event == "recalibration_started"
    assert chunks[3].report.engine.phase == "recalibrating"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"audio": np.zeros(0, np.float32)}, "empty"),
        ({"audio": np.full(16000, np.nan, np.float32)}, "NaN"),
        ({"audio": np.zeros(100, np.float32)}, "too short"),
        ({"portrait": np.zeros((8, 8, 3), np.uint8)}, "too small"),
        ({"portrait": np.zeros((64, 64), np.uint8)}, "RGB"),
        ({"portrait": np.zeros((64, 64, 3), np.float32)}, "uint8"),
        ({"sample_rate": 0}, "sample_rate"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_inputs_raise_clear_errors(pipe, portrait, change, message):
    fields = {"portrait": portrait, "audio": speech(1.0, 16000), "sample_rate": 16000, "seed": 0} | change
    with pytest.raises(ValueError, match=message):
        list(pipe.stream(GenerationRequest(**fields)))


@pytest.mark.parametrize("max_area", [0, -5, 10])
def test_absurd_sizes_are_refused(pipe, portrait, max_area):
    request = GenerationRequest(portrait=portrait, audio=speech(1.0, 16000), sample_rate=16000)
    with pytest.raises(ValueError, match="max_area"):
        pipe.stream(replace(request, max_area=max_area))


def test_live_audio_buffers_stay_bounded_over_a_long_input(pipe):
    encoder: AudioEncoder = pipe.audio_encoder
    rate = 16000
    audio = speech(40.0, rate)
    timeline = AudioTimeline(iter(np.array_split(audio, 40)), rate, encoder)
    largest, frame = 0, DROPPED_FIRST_FRAMES
    for block, (_, valid) in enumerate(timeline.feature_blocks()):
        stop = block * 12 + valid
        timeline.samples_for_frames(frame, stop, FPS)
        frame = stop
        largest = max(largest, timeline._buffer.size, timeline._encoder._buffer.size)
    assert frame > 900  # the whole 40 s went through
    assert largest <= 7 * rate  # a feed piece, a block, the lookahead and the encoder's left context


def test_an_unknown_kv_format_is_refused_before_anything_runs(pipe, portrait):
    request = GenerationRequest(portrait=portrait, audio=speech(1.0, 16000), sample_rate=16000)
    with pytest.raises(ValueError, match="kv_format"):
        pipe.stream(replace(request, kv_format="int3"))


def test_a_later_run_on_the_same_portrait_starts_from_the_first_runs_warmed_decoder(
    pipe, portrait, monkeypatch
):
    """The decoder's warm-up on the motion latents runs once per portrait and warm-up mode; its host copy gives a
    later run (compare mode's second, a regeneration) the frames a warm-up of its own gives."""
    warmups = []
    original = StreamingDecoder.decode_block

    def counting(self, latents):
        if self.latent_frames_done == 0:  # a fresh decoder's first decode is its warm-up
            warmups.append(latents.shape[2])
        return original(self, latents)

    monkeypatch.setattr(StreamingDecoder, "decode_block", counting)
    for entry in pipe.portrait_latents._entries.values():
        entry.warmed.clear()  # nothing warmed yet (the portraits' encodes stay: they are not under test)
    audio = speech(1.0, 16000)
    warmed = run(pipe, portrait, audio, 16000, ISPAPolicy(k_fraction=0.5, t_warm=6))
    restored = run(pipe, portrait, audio, 16000, ISPAPolicy(k_fraction=0.5, t_warm=6))
    assert warmups == [MOTION_LATENT_FRAMES]
    for a, b in zip(warmed, restored, strict=True):
        assert np.array_equal(a.frames, b.frames) and np.array_equal(a.audio, b.audio)
    cache = pipe.portrait_latents
    (latents,) = [
        entry for entry in cache._entries.values() if entry.warmed
    ]  # kept with this portrait's latents
    kept = latents.warmed["sink"]
    assert all(t.device.type == "cpu" for t in kept.cache if isinstance(t, torch.Tensor))  # host memory
    copy = cache.warmed_decoder(latents, "sink", torch.device("cpu"))
    for mine, theirs in zip(copy.cache, kept.cache, strict=True):  # a copy per run, equal to the kept one
        assert (mine is None and theirs is None) or (torch.equal(mine, theirs) and mine is not theirs)
    assert cache.warmed_decoder(latents, "all", torch.device("cpu")) is None  # each warm-up mode its own


def test_a_non_finite_lse_stops_the_run_with_a_clear_error_and_the_same_pipeline_runs_on(
    pipe, portrait, monkeypatch
):
    """NaN keys in layer 1 (the first run only) raise at the block's end, not as a device-side assert that would
    leave a CUDA process unable to run anything; the next run on the same pipeline is the clean one exactly."""
    audio = speech(0.5, 16000)  # 1 block
    clean = run(pipe, portrait, audio, 16000, FullPolicy())
    original = AttentionSession.self_attention

    def nan_keys_in_layer_1(self, layer, q, local_k, *args, **kwargs):
        if layer == 1:
            local_k = torch.full_like(local_k, float("nan"))
        return original(self, layer, q, local_k, *args, **kwargs)

    monkeypatch.setattr(AttentionSession, "self_attention", nan_keys_in_layer_1)
    with pytest.raises(RuntimeError, match=r"block 0: .* layer\(s\) \[.*\] gave a NaN") as caught:
        run(pipe, portrait, audio, 16000, FullPolicy())
    named = str(caught.value).split("[")[1].split("]")[0]
    assert 1 in [int(layer) for layer in named.split(",")]  # NaN spreads to the layers and steps after it
    monkeypatch.undo()
    again = run(pipe, portrait, audio, 16000, FullPolicy())
    assert len(again) == len(clean) == 1
    for a, b in zip(clean, again, strict=True):
        assert np.array_equal(a.frames, b.frames) and np.array_equal(a.audio, b.audio)


def test_fp8_all_holds_exactly_the_sink_difference_less_than_fp8(pipe, portrait):
    audio = speech(1.0, 16000)
    fp8 = run(pipe, portrait, audio, 16000, FullPolicy(), kv_format="fp8")
    both = run(pipe, portrait, audio, 16000, FullPolicy(), kv_format="fp8-all")
    config = pipe.dit.config
    height, width = pipe.output_size(portrait)
    sink_tokens = pipe.dit.sink_token_count(height // 8, width // 8)
    head_dim = config.dim // config.num_heads
    # per sink token, keys and values: fp32 model values, or e4m3 codes plus one fp32 scale per head
    saved = config.num_layers * sink_tokens * 2 * (config.dim * 4 - config.num_heads * (head_dim + 4))
    for a, b in zip(fp8, both, strict=True):
        assert a.report.engine.kv_bytes - b.report.engine.kv_bytes == saved
    assert not all(np.array_equal(a.frames, b.frames) for a, b in zip(fp8, both, strict=True))


class _Calls:
    """Records the pipeline's calls into the DiT and the decoder during one run."""

    def __init__(self, monkeypatch, pipe) -> None:
        self.events: list[tuple[str, tuple]] = []
        for name in ("prefill_sink", "forward_block"):
            original = getattr(pipe.dit, name)
            monkeypatch.setattr(pipe.dit, name, self._recorder(name, original))
        original_decode = StreamingDecoder.decode_block

        def decode_block(decoder, latents):
            self.events.append(("decode_block", (latents.clone(),)))
            return original_decode(decoder, latents)

        monkeypatch.setattr(StreamingDecoder, "decode_block", decode_block)

    def _recorder(self, name, original):
        def call(*args, **kwargs):
            self.events.append((name, args))
            return original(*args, **kwargs)

        return call

    def named(self, name: str) -> list[tuple]:
        return [args for event, args in self.events if event == name]


def test_sink_refresh_off_by_default_prefills_once(pipe, portrait, monkeypatch):
    calls = _Calls(monkeypatch, pipe)
    default = run(pipe, portrait, speech(2.3, 16000), 16000, FullPolicy())
    assert len(calls.named("prefill_sink")) == 1 and calls.events[0][0] == "prefill_sink"
    off = run(pipe, portrait, speech(2.3, 16000), 16000, FullPolicy(), refresh_sink=False)
    assert len(off) == len(default) == 5
    for a, b in zip(off, default, strict=True):
        assert np.array_equal(a.frames, b.frames)


def test_sink_refresh_prefills_again_once_at_clip_1_from_the_first_latent_frame(pipe, portrait, monkeypatch):
    audio = speech(2.3, 16000)
    off = run(pipe, portrait, audio, 16000, FullPolicy())
    calls = _Calls(monkeypatch, pipe)
    on = run(pipe, portrait, audio, 16000, FullPolicy(), refresh_sink=True)

    prefills = calls.named("prefill_sink")
    assert len(prefills) == 2
    refill_at = next(i for i, (name, _) in enumerate(calls.events) if name == "prefill_sink" and i > 0)
    forwards_before = sum(name == "forward_block" for name, _ in calls.events[:refill_at])
    assert forwards_before == 4 * 4  # clip 0 = 4 blocks × 4 steps, then the refresh, before block 4
    # The first decode that is not the warm-up on the motion latents (which this portrait's earlier run made).
    block_0 = next(
        args[0] for args in calls.named("decode_block") if args[0].shape[2] != MOTION_LATENT_FRAMES
    )
    (_, first_ref, first_motion, _), (_, new_ref, new_motion, _) = prefills
    assert torch.equal(new_ref, block_0[:, :, :1])  # the first generated latent frame
    assert not torch.equal(new_ref, first_ref)
    assert new_motion is first_motion  # the motion context stays, as in the 5-GPU pipeline

    for a, b in zip(on[:4], off[:4], strict=True):  # clip 0 is untouched
        assert np.array_equal(a.frames, b.frames)
    assert not np.array_equal(on[4].frames, off[4].frames)


def test_refresh_sink_must_be_a_bool(pipe, portrait):
    request = GenerationRequest(portrait=portrait, audio=speech(1.0, 16000), sample_rate=16000)
    with pytest.raises(ValueError, match="refresh_sink"):
        pipe.stream(replace(request, refresh_sink="yes"))


def test_compare_runs_share_one_portrait_encode(pipe):
    portrait = np.random.default_rng(7).integers(0, 256, size=(180, 100, 3), dtype=np.uint8)
    request = GenerationRequest(portrait=portrait, audio=speech(0.8, 16000), sample_rate=16000, seed=1)
    before = pipe.portrait_latents.encodes
    streams = [pipe.stream(replace(request, policy=p)) for p in (FullPolicy(), ISPAPolicy(t_warm=6))]
    for _ in zip(*streams, strict=True):
        pass
    assert pipe.portrait_latents.encodes == before + 1


def test_the_pipelines_engine_switches_reach_every_stage_session(pipe, portrait, monkeypatch):
    request = GenerationRequest(portrait=portrait, audio=speech(0.5, 16000), sample_rate=16000, steps=2)
    height, width = pipe.check_run(request)
    z, h, w = (
        pipe.vae.vae.config.z_dim,
        height // 8,
        width // 8,
    )  # zero latents: the switches are checked here
    latents = PortraitLatents(torch.zeros(1, z, 1, h, w), torch.zeros(1, z, 92, h, w))
    monkeypatch.setattr(pipe.portrait_latents, "get", lambda fitted: latents)
    pipe.statistics_precision, pipe.fused_merge = "bf16", True
    try:
        spec, _ = pipe.run_spec(request, height, width)
    finally:
        pipe.statistics_precision, pipe.fused_merge = None, False
    assert (spec.steps, spec.statistics_precision, spec.fused_merge) == (2, "bf16", True)
    for each in (spec, replace(spec, statistics_precision=None, fused_merge=False)):
        stage = DenoisingStage(pipe.dit, DenoisingSchedule.liveavatar(each.steps), each)
        try:
            assert stage.steps == range(2)
            assert stage.session.statistics_precision == each.statistics_precision
            assert stage.session.fused_merge == each.fused_merge
        finally:
            stage.close()
