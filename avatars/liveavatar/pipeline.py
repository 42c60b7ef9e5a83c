"""LiveAvatar streaming generation: a portrait and speech in, one chunk of video per 12-frame block out.

The loop, per block k (latent frames 3k..3k+2, video frames 12k..12k+11 at 25 fps):
1. the block's 12 wav2vec2 features (from one pass over the whole clip when it is known, else computed as the
   audio arrives) → the DiT's audio tokens, padded with the block's first frame as the official loop does;
2. noise for the block from the run's own generator — one draw per 4-block clip seeded `seed + clip`, the
   official single-GPU layout — then 4 Euler steps of the flow-matching schedule (shift 3), each attending
   through the ISPA session to the sink and to that step's own history ring;
3. `session.end_block()`: the policy may absorb or recalibrate here, and reports the KV figures;
4. the VAE decodes the block with its causal cache (warmed once with the last 19 motion latents, as the
   official decode sees motion latents in front of the first clip); the first block drops its first 3 frames
   as the official pipeline does, and the last block is cut where the audio ends.
With `refresh_sink`, the sink is prefilled again before block 4 with block 0's first latent frame as reference.

Nothing grows with video length: chunks are handed out, the audio buffers of live input keep only what is
still needed (audio known in full gets its features in one pass, as the official pipeline computes them),
RoPE angles come from positions (no table to run off), and the KV history is the session's bounded rings.
Each `stream()` call owns its session, decoder cache and random generators, so two runs (Full and ISPA with
the same seed) can share one loaded model and be advanced alternately, block by block.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from avatars.base import AvatarChunk, ChunkReport, ChunkTimings, GenerationRequest
from avatars.liveavatar.block_layout import (
    BLOCKS_PER_CLIP,
    DROPPED_FIRST_FRAMES,
    FPS,
    LATENT_FRAMES_PER_BLOCK,
    VIDEO_FRAMES_PER_BLOCK,
    cache_layout,
)
from avatars.liveavatar.dit import LiveAvatarDiT, block_audio_window
from avatars.liveavatar.dit.text_context import TextContext
from avatars.liveavatar.encoders.audio import SAMPLE_RATE, AudioEncoder
from avatars.liveavatar.encoders.audio_stream import StreamingAudioEncoder
from avatars.liveavatar.encoders.text import TextEncoder
from avatars.liveavatar.encoders.vae import MOTION_LATENT_FRAMES, DecoderState, StreamingDecoder, WanVAE
from avatars.liveavatar.portrait_latents import PortraitLatentCache, PortraitLatents
from avatars.liveavatar.schedule import DenoisingSchedule, euler_step
from avatars.liveavatar.sizing import SizeChoice, choose_size, fit_portrait
from avatars.media.audio import pcm_to_float32
from avatars.media.portrait import check_rgb_image
from ispa import AttentionSession, BlockReport, KVLayerFactory, Policy
from ispa.checks import check_positive_int, is_int
from ispa.quantized_cache import kv_layer_factory

logger = logging.getLogger(__name__)

REF_SHIFT_RANGE = (4, 30)  # the official `random.randint(4, 30)`, redrawn every forward


class RunControl:
    """Flags the app flips while a run streams; the run reads them between blocks. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._recalibrate = False
        self._cancelled = False

    def request_recalibration(self) -> None:
        with self._lock:
            self._recalibrate = True

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True

    @property
    def cancelled(self) -> bool:
        with self._lock:
            return self._cancelled

    def take_recalibration(self) -> bool:
        """True once per request."""
        with self._lock:
            requested, self._recalibrate = self._recalibrate, False
            return requested


class LiveAvatarPipeline:
    """The DiT and its three encoders, loaded once; `stream()` runs one generation."""

    def __init__(
        self,
        dit: LiveAvatarDiT,
        audio_encoder: AudioEncoder,
        text_encoder: TextEncoder,
        vae: WanVAE,
        *,
        label: str,
        is_test_model: bool,
        size_divisor: int,
        sizes: tuple[SizeChoice, ...],
    ) -> None:
        if not sizes:
            raise ValueError("a pipeline needs at least one size choice")
        self.dit = dit
        self.audio_encoder = audio_encoder
        self.text_encoder = text_encoder
        self.vae = vae
        self.label = label
        self.is_test_model = is_test_model
        self.size_divisor = size_divisor
        self.sizes = sizes
        self.sample_rate = SAMPLE_RATE
        self.fps = FPS
        self.schedule = DenoisingSchedule.liveavatar()
        self.portrait_latents = PortraitLatentCache(vae)
        # Decode block k while the DiT runs block k+1 (`_BlockDecoder`); None: on CUDA only (on a CPU both would
        # share the same cores). Chunks are the same either way.
        self.overlap_decode: bool | None = None

    @property
    def device(self) -> torch.device:
        return self.dit.device

    def size_choices(self) -> list[tuple[str, int]]:
        """(label, max pixel area) for a size dropdown; the first is the default."""
        return [(s.label, s.max_area) for s in self.sizes]

    def output_size(self, portrait: np.ndarray, max_area: int | None = None) -> tuple[int, int]:
        """(height, width) of the video made from this portrait under `max_area` (default: the first choice)."""
        area = self.sizes[0].max_area if max_area is None else max_area
        check_positive_int(area, "max_area (pixels)")
        return choose_size(portrait.shape[0], portrait.shape[1], area, self.size_divisor)

    # ---- one run -------------------------------------------------------------------------------------------
    def stream(
        self,
        request: GenerationRequest,
        policy: Policy,
        *,
        max_area: int | None = None,
        control: RunControl | None = None,
        kv_format: str = "bf16",
        refresh_sink: bool = False,
        shared_warmup: SharedDecoderWarmup | None = None,
    ) -> Iterator[AvatarChunk]:
        """Generate chunk by chunk. Bad input raises ValueError before anything runs.

        Closing the generator (or `control.cancel()`, honoured between blocks) ends the run and frees what it
        held on the device. `refresh_sink`: at the start of clip 1 (block 4), prefill the sink again with the
        first generated latent frame as its reference, as the official 5-GPU pipeline does (and the single-GPU
        one with `--enable_online_decode`); off by default, as in the official single-GPU scripts.
        `shared_warmup`: one object given to the runs of one request (compare mode) so that the decoder is warmed
        up once for them; the frames are the same as without it.
        """
        height, width, kv_layer = self.check_run(request, policy, max_area, kv_format, refresh_sink)
        if shared_warmup is not None and not isinstance(shared_warmup, SharedDecoderWarmup):
            raise ValueError(f"shared_warmup must be a SharedDecoderWarmup or None, got {shared_warmup!r}")
        control = control or RunControl()
        return self._run(request, policy, height, width, control, kv_layer, refresh_sink, shared_warmup)

    def check_run(
        self,
        request: GenerationRequest,
        policy: Policy,
        max_area: int | None,
        kv_format: str,
        refresh_sink: bool,
    ) -> tuple[int, int, KVLayerFactory]:
        """`stream()`'s input checks: (height, width, KV storage) of the run, or ValueError naming the field."""
        portrait = _check_portrait(request.portrait)
        check_positive_int(request.sample_rate, "sample_rate")
        if not is_int(request.seed) or request.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {request.seed!r}")
        if not isinstance(policy, Policy):
            raise ValueError(f"policy must be an ISPA Policy (FullPolicy or ISPAPolicy), got {policy!r}")
        kv_layer = kv_layer_factory(kv_format)  # `kv_format`: one of ispa.quantized_cache.KV_FORMATS
        if not isinstance(refresh_sink, bool):
            raise ValueError(f"refresh_sink must be True or False, got {refresh_sink!r}")
        height, width = self.output_size(portrait, max_area)
        return height, width, kv_layer

    def _run(
        self,
        request: GenerationRequest,
        policy: Policy,
        height: int,
        width: int,
        control: RunControl,
        kv_layer: KVLayerFactory,
        refresh_sink: bool,
        shared_warmup: SharedDecoderWarmup | None = None,
    ) -> Iterator[AvatarChunk]:
        dit, device = self.dit, self.device
        audio = _AudioTimeline(request.audio, request.sample_rate, self.audio_encoder)
        fitted = fit_portrait(request.portrait, height, width)
        latent_h, latent_w = height // 8, width // 8

        # 1. Conditioning: text, and the portrait's reference and motion latents (encoded once per portrait)
        context = dit.embed_text(self.text_encoder.encode(request.prompt)[None].to(device))
        portrait_latents = self.portrait_latents.get(fitted)
        ref_latent = portrait_latents.reference.to(device)
        motion_latents = portrait_latents.motion.to(device)

        # 2. The run's KV state and sink
        layout = cache_layout(dit.tokens_per_frame(latent_h, latent_w))
        session = AttentionSession(policy, num_layers=dit.config.num_layers, layout=layout, kv_layer=kv_layer)
        decoder = _BlockDecoder(self.vae.stream_decoder(), device, self.overlap_decode)
        try:
            dit.prefill_sink(session, ref_latent, motion_latents, context)
            # Warm the causal cache on the 19 motion latents the sink sees, not all 92 (5× this decode; the
            # difference is measured in the README's "Fidelity"); those frames are not shown.
            warm = shared_warmup.take(portrait_latents) if shared_warmup is not None else None
            if warm is not None:
                decoder.restore(warm)
            else:
                decoder.decode_now(motion_latents[:, :, -MOTION_LATENT_FRAMES:])
                if shared_warmup is not None:
                    shared_warmup.offer(portrait_latents, decoder.snapshot())
            del ref_latent
            sink_refresh = _SinkRefresh(motion_latents) if refresh_sink else None
            del motion_latents
            yield from self._blocks(
                request.seed, session, decoder, audio, context, latent_h, latent_w, control, sink_refresh
            )
        finally:
            decoder.close()  # first: a decode in flight still uses the device
            session.close()
            del decoder
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def _blocks(
        self,
        seed: int,
        session: AttentionSession,
        decodes: _BlockDecoder,
        audio: _AudioTimeline,
        context: TextContext,
        latent_h: int,
        latent_w: int,
        control: RunControl,
        sink_refresh: _SinkRefresh | None,
    ) -> Iterator[AvatarChunk]:
        dit, device = self.dit, self.device
        ref_shifts = random.Random(seed)
        clip_noise = None
        video_frames_done = 0  # frames of the model's timeline handed out or dropped
        pending: _PendingChunk | None = None  # the block in decoding; handed out as soon as its frames exist
        handed_out = 0.0  # seconds of this block spent handing out or waiting for the previous one

        def hand_out(wait: bool) -> Iterator[AvatarChunk]:
            """Yield the pending chunk if its decode is done (or, with `wait`, once it is). Returns whether a chunk
            was handed out, after which the caller honours a cancel as at a block boundary."""
            nonlocal pending, handed_out
            if pending is None or not (wait or pending.done()):
                return False
            started = time.perf_counter()
            chunk, pending = pending.chunk(audio), None
            if chunk is not None:
                yield chunk
            handed_out += time.perf_counter() - started
            return chunk is not None

        for block, (features, valid_frames) in enumerate(audio.feature_blocks()):
            if control.cancelled:  # the finished block's chunk still goes out, as without the overlap
                yield from hand_out(wait=True)
                return
            started = time.perf_counter()
            handed_out = 0.0

            if sink_refresh is not None and block == BLOCKS_PER_CLIP:
                sink_refresh.prefill(dit, session, context)

            # 1. Noise: one draw per clip of 4 blocks, from the run's own generator
            within_clip = block % BLOCKS_PER_CLIP
            if within_clip == 0:
                generator = torch.Generator(device).manual_seed(seed + block // BLOCKS_PER_CLIP)
                shape = (1, dit.config.in_dim, LATENT_FRAMES_PER_BLOCK * BLOCKS_PER_CLIP, latent_h, latent_w)
                clip_noise = torch.randn(shape, generator=generator, device=device, dtype=dit.dtype)
            first = within_clip * LATENT_FRAMES_PER_BLOCK
            latents = clip_noise[:, :, first : first + LATENT_FRAMES_PER_BLOCK]

            # 2. Denoise: 4 Euler steps, step i reading and extending history ring i; the previous block's
            #    chunk is handed out between steps as soon as its decode (running alongside) is done
            window = block_audio_window(features.permute(1, 2, 0)[None].to(device), 0, VIDEO_FRAMES_PER_BLOCK)
            audio_tokens = dit.encode_audio(window)
            schedule = self.schedule
            for step, timestep in enumerate(schedule.timesteps):
                flow = dit.forward_block(
                    session,
                    latents,
                    timestep,
                    context,
                    audio_tokens,
                    frame_index=block * LATENT_FRAMES_PER_BLOCK,
                    ring=step,
                    ref_shift=ref_shifts.randint(*REF_SHIFT_RANGE),
                )
                latents = euler_step(latents, flow, schedule.sigmas[step], schedule.sigmas[step + 1])
                if (yield from hand_out(wait=step == len(schedule.timesteps) - 1)) and control.cancelled:
                    return
            # Once per block, after the previous block's chunk is out (with the overlap, during this block's
            # steps): a recalibration asked for on seeing it starts at this block's end, as without the overlap.
            if control.take_recalibration():
                session.request_recalibration()
            report = session.end_block()
            if sink_refresh is not None and block == 0:
                sink_refresh.reference = latents[:, :, :1]
            _synchronize(device)
            model_seconds = time.perf_counter() - started - handed_out

            # 3. Decode with the causal cache (alongside the next block's DiT where it overlaps); keep the
            #    frames the audio covers
            start = DROPPED_FIRST_FRAMES if block == 0 else 0
            stop = min(VIDEO_FRAMES_PER_BLOCK, valid_frames)
            pending = _PendingChunk(
                decodes.submit(latents), block, start, stop, video_frames_done + start, report, model_seconds
            )
            video_frames_done += VIDEO_FRAMES_PER_BLOCK
            # Done already unless it overlaps. Live audio may keep the next block waiting for its speech, so there
            # the chunk is handed out before the next block starts (no overlap).
            if (yield from hand_out(wait=audio.live)) and control.cancelled:
                return
        yield from hand_out(wait=True)


class SharedDecoderWarmup:
    """The warmed decoder cache of one request's first run, handed to its next run of the same portrait and size.

    Compare mode runs Full and ISPA on one portrait: both warm the VAE decoder's causal cache on the same motion
    latents, so the second can start from a copy of the first's warm state instead of decoding them again. The
    copy is held from the first run's warm-up until the second run takes it (then it is that run's own cache), so
    it adds no memory once both run. Thread-safe; each offered state is taken at most once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._offered: tuple[PortraitLatents, DecoderState] | None = None

    def offer(self, latents: PortraitLatents, state: DecoderState) -> None:
        with self._lock:
            if self._offered is None:
                self._offered = (latents, state)

    def take(self, latents: PortraitLatents) -> DecoderState | None:
        """The offered state when it was warmed on these very latents (same portrait and size), else None."""
        with self._lock:
            if self._offered is None or self._offered[0] is not latents:
                return None
            state, self._offered = self._offered[1], None
            return state


class _BlockDecoder:
    """Decodes a run's blocks with the causal cache, in order. With `overlap` (default: on CUDA) a worker thread
    decodes block k, on a CUDA stream of its own, while the caller runs the DiT of block k+1; otherwise each decode
    runs at once in the caller's thread. Either way the same calls run in the same order, so the frames are the
    same. Each result carries the decode's own seconds and the seconds the caller was blocked on it (the rest
    was hidden behind the DiT)."""

    def __init__(self, decoder: StreamingDecoder, device: torch.device, overlap: bool | None) -> None:
        self._decoder = decoder
        self._device = device
        overlap = device.type == "cuda" if overlap is None else overlap
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="vae-decode") if overlap else None
        self._stream = torch.cuda.Stream(device) if overlap and device.type == "cuda" else None

    def submit(self, latents: torch.Tensor) -> _Decode:
        started = time.perf_counter()
        if self._pool is None:
            future: Future = Future()
            future.set_result(self._decode(latents))
        else:
            if self._stream is not None:  # the DiT's work on `latents` comes first
                self._stream.wait_stream(torch.cuda.current_stream(self._device))
            future = self._pool.submit(self._decode, latents)
        # `latents` stays referenced until the decode is done, so its memory is not reused while it is read
        return _Decode(future, latents, blocked_seconds=time.perf_counter() - started)

    def _decode(self, latents: torch.Tensor) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            # the copy to the host waits for the decode's kernels
            frames = _to_uint8_frames(self._decoder.decode_block(latents))
        return frames, time.perf_counter() - started

    def decode_now(self, latents: torch.Tensor) -> None:
        """Decode without handing anything out (the warm-up of the causal cache), on the same stream and thread."""
        self.submit(latents).result()

    def snapshot(self) -> DecoderState:
        """A copy of the causal cache (call between decodes: none is in flight after `decode_now`)."""
        return self._decoder.snapshot()

    def restore(self, state: DecoderState) -> None:
        self._decoder.restore(state)

    def close(self) -> None:
        """Wait for a decode in flight (it uses the decoder's cache) and stop the worker thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class _Decode:
    future: Future
    latents: torch.Tensor
    blocked_seconds: float

    def result(self) -> tuple[np.ndarray, float, float]:
        """(frames, decode seconds, seconds of it hidden behind other work), waiting for the decode if needed."""
        started = time.perf_counter()
        frames, seconds = self.future.result()
        blocked = self.blocked_seconds + time.perf_counter() - started
        return frames, seconds, max(0.0, seconds - blocked)


@dataclass
class _PendingChunk:
    """A denoised block whose frames are being decoded, and where its chunk sits on the run's timeline."""

    decode: _Decode
    block: int
    start: int  # frames of the block to keep: [start, stop)
    stop: int
    first_frame: int
    report: BlockReport
    model_seconds: float

    def done(self) -> bool:
        return self.decode.future.done()

    def chunk(self, audio: _AudioTimeline) -> AvatarChunk | None:
        """The chunk (waiting for its frames), or None when the audio covers none of the block's frames."""
        video, decode_seconds, hidden = self.decode.result()
        if self.stop <= self.start:
            return None
        frames = video[self.start : self.stop]
        last_frame = self.first_frame + len(frames)
        timings = ChunkTimings(
            model_seconds=self.model_seconds, decode_seconds=decode_seconds, decode_hidden_seconds=hidden
        )
        return AvatarChunk(
            index=self.block,
            frames=frames,
            audio=audio.samples_for_frames(self.first_frame, last_frame, FPS),
            sample_rate=audio.sample_rate,
            fps=FPS,
            report=ChunkReport(
                engine=self.report, timings=timings, frames=len(frames), end_seconds=last_frame / FPS
            ),
        )


@dataclass
class _SinkRefresh:
    """What the sink refresh at clip 1 needs: the motion latents of the first prefill and the new reference."""

    motion_latents: torch.Tensor
    reference: torch.Tensor | None = None  # the first generated latent frame, set after block 0

    def prefill(self, dit: LiveAvatarDiT, session: AttentionSession, context: TextContext) -> None:
        dit.prefill_sink(session, self.reference, self.motion_latents, context)


class _AudioTimeline:
    """The request's audio as it arrives: wav2vec2 features in blocks of 12 frames, and raw slices per chunk.

    Whole audio (an array) gets the official features: one wav2vec2 pass over the clip
    (`AudioEncoder.frame_features`, bit-equal to the official computation). Live audio (an iterable of pieces)
    goes through the streaming encoder at its default settings, chosen by `bench/live_audio_fidelity.py` to
    stay closest to the whole-clip features; that path keeps its buffers bounded. Raw samples are kept only
    until their chunk is handed out.
    """

    def __init__(
        self, audio: np.ndarray | Iterable[np.ndarray], sample_rate: int, encoder: AudioEncoder
    ) -> None:
        self.sample_rate = sample_rate
        self._whole_clip_encoder = encoder
        self._whole: np.ndarray | None = None
        if isinstance(audio, np.ndarray):
            self._whole = pcm_to_float32(audio)
            if self._whole.size == 0:
                raise ValueError("audio is empty (zero samples)")
        else:
            self._pieces = audio
            self._encoder = StreamingAudioEncoder(encoder, sample_rate, group_frames=VIDEO_FRAMES_PER_BLOCK)
        self._buffer = np.zeros(0, dtype=np.float32)
        self._buffer_start = 0  # sample index of _buffer[0]
        self._features = None  # features not yet handed out, [n, layers, dim]

    def feature_blocks(self) -> Iterator[tuple[torch.Tensor, int]]:
        """(features [12, layers, dim], frames with real audio) per block, as soon as each is computable."""
        if self._whole is not None:
            self._buffer = self._whole
            features = self._whole_clip_encoder.frame_features(self._whole, self.sample_rate)
            yield from self._take(features, final=True)
            return
        for piece in self._pieces:
            if piece is None:
                break
            samples = pcm_to_float32(piece)
            self._buffer = np.concatenate([self._buffer, samples])
            yield from self._take(self._encoder.push(samples), final=False)
        if self._encoder.frames_done == 0 and self._received() == 0:
            raise ValueError("audio is empty (zero samples)")
        yield from self._take(self._encoder.finish(), final=True)

    def _take(self, new: torch.Tensor, final: bool) -> Iterator[tuple[torch.Tensor, int]]:
        pending = new if self._features is None else torch.cat([self._features, new])
        while len(pending) >= VIDEO_FRAMES_PER_BLOCK:
            yield pending[:VIDEO_FRAMES_PER_BLOCK], VIDEO_FRAMES_PER_BLOCK
            pending = pending[VIDEO_FRAMES_PER_BLOCK:]
        if final and len(pending):
            # The official code zero-fills the features past the end of the audio; those frames are cut.
            padding = pending.new_zeros(VIDEO_FRAMES_PER_BLOCK - len(pending), *pending.shape[1:])
            yield torch.cat([pending, padding]), len(pending)
            pending = pending[:0]
        self._features = pending

    @property
    def live(self) -> bool:
        """True when the audio arrives piece by piece (the next block may wait for it)."""
        return self._whole is None

    def _received(self) -> int:
        return self._buffer_start + self._buffer.size

    def samples_for_frames(self, first_frame: int, last_frame: int, fps: int) -> np.ndarray:
        """The audio that plays with video frames [first_frame, last_frame), zero-padded past the end."""
        start = round(first_frame * self.sample_rate / fps)
        stop = round(last_frame * self.sample_rate / fps)
        begin = start - self._buffer_start
        out = self._buffer[max(0, begin) : stop - self._buffer_start]
        if begin < 0:  # never: chunks are handed out in order
            raise RuntimeError("audio for an earlier chunk was already released")
        if out.size < stop - start:
            out = np.concatenate([out, np.zeros(stop - start - out.size, dtype=np.float32)])
        self._buffer = self._buffer[max(0, stop - self._buffer_start) :]
        self._buffer_start = max(self._buffer_start, stop)
        return out


def _check_portrait(image: np.ndarray) -> np.ndarray:
    check_rgb_image(image)
    if min(image.shape[:2]) < 16:
        raise ValueError(f"portrait is too small ({image.shape[1]}×{image.shape[0]} pixels)")
    return image


def _to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[1, 3, T, H, W] in [-1, 1] → [T, H, W, 3] uint8 on the host."""
    pixels = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).cpu().numpy()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
