"""`python -m avatars.liveavatar`: portrait + speech (+ prompt) → an mp4 with audio and a JSON report.

Bad input exits with status 2 and a one-line reason on stderr; the mp4 is written chunk by chunk, so a long
run never holds its frames in memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from avatars.base import AvatarBackend, GenerationRequest
from avatars.liveavatar.block_layout import FPS
from avatars.liveavatar.compiled import set_compiled_regions
from avatars.liveavatar.distributed import launched_by_torchrun, run_on_ranks
from avatars.liveavatar.loading import MODEL_NAMES, load_pipeline
from avatars.liveavatar.pipeline import LiveAvatarPipeline
from avatars.liveavatar.schedule import STEP_CHOICES
from avatars.liveavatar.streaming.decoding import DECODER_WARMUPS, DEFAULT_DECODER_WARMUP
from avatars.liveavatar.weights.errors import CheckpointError
from avatars.media.audio import AudioReadError, read_audio_file
from avatars.media.portrait import PortraitReadError, read_portrait
from avatars.media.run_video import RunVideoWriter
from ispa import POLICIES, ISPAPolicy, make_policy
from ispa.quantized_cache import KV_FORMATS

logger = logging.getLogger(__name__)


class InputError(ValueError):
    """A user input the CLI cannot use; its message is printed as the one-line reason."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m avatars.liveavatar",
        description="Generate a talking-head video with LiveAvatar under a KV policy: Full, ISPA, or a comparison "
        "at ISPA's memory (evict, window, salience; see docs/engine.md).",
    )
    parser.add_argument(
        "--model", choices=MODEL_NAMES, default="tiny", help="tiny = untrained CPU test model"
    )
    parser.add_argument("--portrait", required=True, type=Path, help="reference image (jpg, png, ...)")
    parser.add_argument("--audio", required=True, type=Path, help="speech (wav, flac, mp3, ogg, m4a, ...)")
    parser.add_argument("--prompt", default="", help="optional text prompt")
    parser.add_argument(
        "--policy",
        choices=tuple(POLICIES),
        default=ISPAPolicy.name,
        help="evict, window and salience match ISPA's KV bytes at the same --k-fraction after --t-warm",
    )
    parser.add_argument(
        "--k-fraction", type=float, default=ISPAPolicy.k_fraction, help="share of layers ISPA turns local"
    )
    parser.add_argument(
        "--t-warm", type=int, default=ISPAPolicy.t_warm, help="warmup length in latent frames (3 per block)"
    )
    parser.add_argument(
        "--lam", type=float, default=ISPAPolicy.lam, help="ridge regulariser λ of the absorption"
    )
    parser.add_argument("--auto-recalibrate", action="store_true", help="re-warm on a scene change")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-area", type=int, default=None, help="pixel budget of the video (default: model's)"
    )
    parser.add_argument("--fp8", action="store_true", help="FP8 linear layers (14b on Hopper/Ada GPUs)")
    parser.add_argument(
        "--kv-format",
        choices=KV_FORMATS,
        default="bf16",
        help="how the KV cache is stored (ispa.quantized_cache); q2: 2 bits per value, sink included; +w: the "
        "newest latent frame of each ring kept in bf16 (KIVI's residual window)",
    )
    parser.add_argument(
        "--refresh-sink",
        action="store_true",
        help="at clip 1, prefill the sink again with the first generated frame (official 5-GPU behaviour)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        choices=STEP_CHOICES,
        default=STEP_CHOICES[0],
        help="denoising steps per block: 4 is the official schedule; 3 and 2 are a deviation from it, faster "
        "and of lower quality (avatars.liveavatar.schedule)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the DiT's pointwise regions (avatars.liveavatar.compiled; the first block pays it)",
    )
    parser.add_argument(
        "--decoder-on-last-dit",
        action="store_true",
        help="under torchrun: the last DiT rank also decodes (2 processes: 2 DiT ranks; see docs/several-gpus.md)",
    )
    parser.add_argument(
        "--audio-fp32",
        action="store_true",
        help="run wav2vec2 in fp32 (the official pipeline, and the default, run it in bf16; the tiny model is fp32)",
    )
    parser.add_argument(
        "--decoder-warmup",
        choices=DECODER_WARMUPS,
        default=DEFAULT_DECODER_WARMUP,
        help="warm the VAE decoder on the last 19 motion latents (sink) or all 92 (all: the official first clip)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output mp4")
    parser.add_argument("--report", type=Path, default=None, help="where to write the JSON report")
    return parser


def read_inputs(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, int]:
    """The portrait (uint8 RGB, upright) and the speech (mono float32 at the file's rate), read as the app reads
    them; a problem becomes an InputError naming the file."""
    try:
        portrait = read_portrait(args.portrait)
    except PortraitReadError as err:
        raise InputError(f"{err} ({args.portrait})") from err
    for note in portrait.notes:
        logger.warning("%s", note)
    try:
        audio, rate, _ = read_audio_file(args.audio)
    except AudioReadError as err:
        raise InputError(f"{err} ({args.audio})") from err
    return portrait.image, audio, rate


def run(args: argparse.Namespace, backend: AvatarBackend) -> dict:
    """One generation on `backend` (the pipeline on this process, or rank 0's lead of a pipeline of ranks)."""
    portrait, audio, rate = read_inputs(args)
    policy = make_policy(
        args.policy,
        k_fraction=args.k_fraction,
        t_warm=args.t_warm,
        lam=args.lam,
        auto_recalibrate=args.auto_recalibrate,
    )
    request = GenerationRequest(
        portrait=portrait,
        audio=audio,
        sample_rate=rate,
        prompt=args.prompt,
        seed=args.seed,
        policy=policy,
        max_area=args.max_area,
        kv_format=args.kv_format,
        refresh_sink=args.refresh_sink,
        steps=args.steps,
    )
    chunks = backend.stream(request)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    writer = RunVideoWriter(args.out)
    blocks, frames = [], 0
    expected_frames = int(len(audio) / rate * FPS)
    started = time.perf_counter()
    try:
        with tqdm(total=expected_frames, unit="frame", desc=f"{args.model}/{args.policy}") as progress:
            for chunk in chunks:
                writer.add(chunk)
                frames += len(chunk.frames)
                blocks.append(chunk.report.to_dict())
                progress.update(len(chunk.frames))
                engine = chunk.report.engine
                progress.set_postfix(phase=engine.phase, kv_gb=f"{engine.kv_bytes / 1e9:.3f}")
    except BaseException:
        writer.discard()
        raise
    writer.close()
    return {
        "model": args.model,
        "model_label": backend.label,
        "policy": args.policy,
        "settings": {
            "k_fraction": args.k_fraction,
            "t_warm": args.t_warm,
            "lam": args.lam,
            "seed": args.seed,
            "kv_format": args.kv_format,
            "refresh_sink": args.refresh_sink,
            "steps": args.steps,
            "compile": args.compile,
            "audio_encoder": _audio_dtype(backend),
            "decoder_warmup": args.decoder_warmup,
        },
        "fps": FPS,
        "frames": frames,
        "seconds": time.perf_counter() - started,
        "blocks": blocks,
    }


def _audio_dtype(backend: AvatarBackend) -> str:
    """The dtype wav2vec2 runs in on this backend ("bf16" or "fp32"), for the report."""
    pipeline = getattr(backend, "pipeline", backend)  # a lead of ranks holds its pipeline
    encoder = getattr(pipeline, "audio_encoder", None)
    if encoder is None:
        return "unknown"
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(encoder.dtype, str(encoder.dtype))


def loaded_pipeline(args: argparse.Namespace, pipeline: LiveAvatarPipeline | None) -> LiveAvatarPipeline:
    """`pipeline` (a test's) or the one `args` names, loaded on this process, compiled if asked, with the
    decoder warm-up `args` asks for."""
    pipeline = pipeline or load_pipeline(args.model, fp8=args.fp8, audio_fp32=args.audio_fp32)
    pipeline.decoder_warmup = args.decoder_warmup
    if args.compile:
        set_compiled_regions(pipeline)
    return pipeline


def main(argv: list[str] | None = None, pipeline: LiveAvatarPipeline | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if launched_by_torchrun():
            if args.decoder_warmup != DEFAULT_DECODER_WARMUP:
                raise ValueError(
                    f"--decoder-warmup {args.decoder_warmup} is not available under torchrun yet"
                )
            report = run_on_ranks(args, pipeline, run)
            if report is None:  # a rank other than 0: it followed rank 0's run
                return 0
        else:
            report = run(args, loaded_pipeline(args, pipeline))
    except (InputError, CheckpointError, ValueError, RuntimeError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.report is not None:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out} ({report['frames']} frames, {report['frames'] / FPS:.2f} s)")
    return 0
