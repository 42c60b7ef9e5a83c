"""Streaming benchmark: LiveAvatar's real loop under Full and under ISPA, with the same seed, portrait and audio.

    python bench/streaming.py --model tiny --blocks 8 --json        # CPU: the tiny test model
    python bench/streaming.py --model 14b --blocks 12 --fp8 --json  # CUDA: real-size parts, random weights

What runs: `LiveAvatarPipeline.stream` (audio features as the audio arrives, 4 denoising steps per 12-frame block
through the ISPA session, streaming VAE decode), first with `FullPolicy`, then with `ISPAPolicy`, on one loaded
model. The runs go one after the other, not interleaved: the GPU's peak-memory counter is global, so only a run
alone on the device has a peak of its own, and at 14B two runs' KV caches (2 x 33 GB) do not fit beside the
weights on an 80 GB card. Full goes first and its first block pays the one-off start-up costs, which is why block 0
is left out of the FPS. `--model 14b` uses `bench.random_pipeline` (bf16, or FP8 linears with `--fp8`); the audio
is synthesised speech-like harmonics, one second longer than the blocks need so every block has its lookahead.

Definitions (per policy; per-block figures come from each chunk's engine report):
- dit_seconds: one block's denoising (audio tokens, 4 DiT forwards, Euler steps, `end_block` with any absorb), up to
  a device sync. decode_seconds: its VAE decode and the copy of its frames to the host; decode_hidden_seconds: the
  part of it that ran alongside the next block's DiT (the decode overlap, on CUDA), which the loop did not wait for.
- block_seconds_median: median over blocks of dit + decode seconds. dit_seconds_median_{warmup,after_warmup}: the
  median DiT seconds of the blocks before and after ISPA's absorb (the same block indices for Full).
- fps: video frames / (dit + decode - decode hidden seconds) over all blocks but the first; fps_after_warmup: over
  the blocks after the absorb. The wav2vec2 features, computed on the audio as it arrives, count in neither.
- kv_bytes_peak: the most K/V bytes the session held after a block (live tensors); kv_bytes_after_warmup: at the
  last block, once the absorb has happened (null before). stats_bytes_peak: the most absorption-statistics bytes
  held during a block (0 for Full).
- peak_allocated_bytes: torch.cuda.max_memory_allocated over the run; peak_allocated_warmup_bytes from the run's
  start (prompt, portrait encodes, sink prefill) to the last warmup block's chunk, where the counter is reset, and
  peak_allocated_after_warmup_bytes over the later blocks. null on CPU.
- warmup_overhead_ratio: over ISPA's warmup blocks that see history (all but block 0), the time spent merging the
  two partial attentions by their log-sum-exp, divided by those blocks' DiT time.
- statistics_overhead_ratio: the same blocks' time accumulating G, C and s, divided by their DiT time.
- decomposition_overhead_ratio: a same-shape comparison on the device: one layer's attention with a full ring,
  (local + history + merge) minus one plain call over all keys, times layers x steps, divided by Full's median DiT
  seconds per block. The exact decomposition costs this much over unsplit attention in every Full block and in
  ISPA's warmup and F-layers.
- absorb_seconds: ISPA's absorb step (every layer's ridge solve and error, ranking, switching layers local).
- kv_ratio_after_warmup: ISPA / Full KV bytes at the last block; dit_speedup_after_warmup: Full / ISPA median DiT
  seconds after the absorb.
- predicted: the same KV and statistics bytes from the memory model (`avatars.liveavatar.memory_plan.terms`).

Prints a row per block as it is measured, then a table; with --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # run as `python bench/streaming.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avatars.base import GenerationRequest
from avatars.liveavatar.block_layout import (
    DENOISING_STEPS,
    FPS,
    HISTORY_BLOCKS,
    LATENT_FRAMES_PER_BLOCK,
    VIDEO_FRAMES_PER_BLOCK,
    cache_layout,
)
from avatars.liveavatar.compiled import set_compiled_regions
from avatars.liveavatar.loading import build_tiny_pipeline
from avatars.liveavatar.memory_plan.terms import kv_cache_bytes, kv_cache_bytes_after_absorb
from avatars.liveavatar.pipeline import LiveAvatarPipeline
from avatars.liveavatar.weights.fp8 import convert_linears_to_fp8
from bench.attention import device_name, median_seconds
from bench.random_pipeline import LIVEAVATAR_14B, build_random_pipeline
from ispa import (
    KV_FORMATS,
    FullPolicy,
    ISPAPolicy,
    Policy,
    attention_with_lse,
    merge_attention,
    statistics_nbytes,
)

PORTRAIT_SHAPES = {
    "tiny": (128, 64),
    "14b": (704, 384),
}  # (height, width); each gives its model's default size
SAMPLE_RATE = 16000
EXTRA_AUDIO_SECONDS = 1.0
PROMPT = "a person speaks to the camera"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(PORTRAIT_SHAPES), default="tiny")
    parser.add_argument("--blocks", type=int, default=8, help="12-frame blocks per run (default 8)")
    parser.add_argument("--fp8", action="store_true", help="FP8 linear layers, as LiveAvatar's --fp8")
    parser.add_argument("--k-fraction", type=float, default=0.5, help="ISPA: share of layers made local")
    parser.add_argument("--t-warm", type=int, default=12, help="ISPA: warmup in latent frames (3 per block)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--kv-format", choices=KV_FORMATS, default="bf16", help="how both runs store their KV history"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the DiT's pointwise regions (first block pays it)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = parser.parse_args(argv)
    if args.blocks < 1:
        parser.error("--blocks must be at least 1")
    if args.seed < 0:
        parser.error("--seed must be non-negative")
    layout = cache_layout(tokens_per_frame=1)  # LiveAvatar's, token count aside
    try:
        ISPAPolicy(k_fraction=args.k_fraction, t_warm=args.t_warm).check_layout(layout, num_layers=1)
    except ValueError as err:
        parser.error(str(err))
    if args.model == "14b" and not torch.cuda.is_available():
        parser.error("--model 14b needs a CUDA GPU; use --model tiny on a CPU")
    return args


def load(model: str, fp8: bool) -> LiveAvatarPipeline:
    if model == "tiny":
        pipe = build_tiny_pipeline()
        if fp8:
            convert_linears_to_fp8(pipe.dit)
        return pipe
    return build_random_pipeline(LIVEAVATAR_14B, "cuda", fp8=fp8)


def speech(seconds: float, seed: int) -> np.ndarray:
    """Speech-like audio: voiced harmonics under a syllable-rate envelope, plus a little noise."""
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    voice = sum(np.sin(2 * np.pi * f * t) / (i + 1) for i, f in enumerate((140, 280, 420, 560)))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return (0.2 * voice * envelope + 0.01 * noise).astype(np.float32)


def make_request(model: str, blocks: int, seed: int) -> GenerationRequest:
    height, width = PORTRAIT_SHAPES[model]
    portrait = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    audio = speech(blocks * VIDEO_FRAMES_PER_BLOCK / FPS + EXTRA_AUDIO_SECONDS, seed)
    return GenerationRequest(
        portrait=portrait, audio=audio, sample_rate=SAMPLE_RATE, prompt=PROMPT, seed=seed
    )


def run_policy(
    pipe: LiveAvatarPipeline,
    request: GenerationRequest,
    policy: Policy,
    blocks: int,
    warmup_blocks: int,
    on_block: Callable[[dict[str, Any]], None] | None = None,
    kv_format: str = "bf16",
    max_area: int | None = None,
) -> dict[str, Any]:
    """Stream `blocks` chunks; per-block figures, plus CUDA peaks before and after the absorb block's end.

    `on_block` gets each block's row as soon as it is measured (the benchmark prints it), so a run cut short by a
    timeout or a crash still leaves what it measured.
    """
    cuda = pipe.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(pipe.device)
        torch.cuda.reset_peak_memory_stats(pipe.device)
    rows: list[dict[str, Any]] = []
    peak_warmup = peak_after = None
    stream = pipe.stream(replace(request, policy=policy, kv_format=kv_format, max_area=max_area))
    try:
        for chunk in itertools.islice(stream, blocks):
            engine, timings = chunk.report.engine, chunk.report.timings
            rows.append(
                {
                    "index": chunk.index,
                    "phase": engine.phase,
                    "event": engine.event,
                    "frames": chunk.report.frames,
                    "dit_seconds": timings.model_seconds,
                    "decode_seconds": timings.decode_seconds,
                    "decode_hidden_seconds": timings.decode_hidden_seconds,
                    "kv_bytes": engine.kv_bytes,
                    "stats_bytes": engine.stats_bytes,
                    "merge_seconds": engine.merge_seconds,
                    "statistics_seconds": engine.statistics_seconds,
                    "absorb_seconds": engine.absorb_seconds,
                    "delta_weight_bytes": engine.delta_weight_bytes,
                }
            )
            if on_block is not None:
                on_block(rows[-1])
            if cuda and chunk.index == warmup_blocks - 1:
                peak_warmup = torch.cuda.max_memory_allocated(pipe.device)
                torch.cuda.reset_peak_memory_stats(pipe.device)
    finally:
        stream.close()
    if len(rows) != blocks:
        raise RuntimeError(f"the run produced {len(rows)} blocks instead of {blocks}")
    if cuda and blocks > warmup_blocks:
        peak_after = torch.cuda.max_memory_allocated(pipe.device)
    if cuda and peak_warmup is None:  # the run ended inside warmup
        peak_warmup = torch.cuda.max_memory_allocated(pipe.device)
    return summarise(rows, warmup_blocks, peak_warmup, peak_after)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _fps(rows: list[dict[str, Any]]) -> float | None:
    seconds = sum(r["dit_seconds"] + r["decode_seconds"] - r["decode_hidden_seconds"] for r in rows)
    return sum(r["frames"] for r in rows) / seconds if rows and seconds > 0 else None


def summarise(
    rows: list[dict[str, Any]], warmup_blocks: int, peak_warmup: int | None, peak_after: int | None
) -> dict[str, Any]:
    warmup, after = rows[:warmup_blocks], rows[warmup_blocks:]
    absorbed = len(rows) >= warmup_blocks
    peaks = [p for p in (peak_warmup, peak_after) if p is not None]
    return {
        "kv_bytes_peak": max(r["kv_bytes"] for r in rows),
        "kv_bytes_after_warmup": rows[-1]["kv_bytes"] if absorbed else None,
        "stats_bytes_peak": max(r["stats_bytes"] for r in rows),
        "delta_weight_bytes": rows[-1]["delta_weight_bytes"],
        "peak_allocated_bytes": max(peaks) if peaks else None,
        "peak_allocated_warmup_bytes": peak_warmup,
        "peak_allocated_after_warmup_bytes": peak_after,
        "block_seconds_median": statistics.median(r["dit_seconds"] + r["decode_seconds"] for r in rows),
        "dit_seconds_median": statistics.median(r["dit_seconds"] for r in rows),
        "dit_seconds_median_warmup": _median([r["dit_seconds"] for r in warmup]),
        "dit_seconds_median_after_warmup": _median([r["dit_seconds"] for r in after]),
        "decode_seconds_median": statistics.median(r["decode_seconds"] for r in rows),
        "absorb_seconds": sum(r["absorb_seconds"] for r in rows),
        "fps": _fps(rows[1:] or rows),
        "fps_after_warmup": _fps(after),
        "frames": sum(r["frames"] for r in rows),
        "blocks": rows,
    }


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def decomposition_seconds(pipe: LiveAvatarPipeline, height: int, width: int) -> dict[str, float]:
    """One layer's attention at the run's shapes with a full ring: one plain call vs local + history + merge."""
    config, device, dtype = pipe.dit.config, pipe.device, pipe.dit.dtype
    latent_h, latent_w = height // 8, width // 8
    block = LATENT_FRAMES_PER_BLOCK * pipe.dit.tokens_per_frame(latent_h, latent_w)
    local = pipe.dit.sink_token_count(latent_h, latent_w) + block
    history = HISTORY_BLOCKS * block
    gen = torch.Generator(device).manual_seed(0)

    def tokens(n: int) -> torch.Tensor:
        shape = (1, n, config.num_heads, config.head_dim)
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    q, local_k, local_v, hist_k, hist_v = (
        tokens(block),
        tokens(local),
        tokens(local),
        tokens(history),
        tokens(history),
    )
    all_k, all_v = torch.cat([local_k, hist_k], 1), torch.cat([local_v, hist_v], 1)

    def decomposed() -> None:
        merge_attention(*attention_with_lse(q, local_k, local_v), *attention_with_lse(q, hist_k, hist_v))

    return {
        "plain_seconds": median_seconds(lambda: attention_with_lse(q, all_k, all_v), device, 1, 3),
        "decomposed_seconds": median_seconds(decomposed, device, 1, 3),
    }


def predictions(
    pipe: LiveAvatarPipeline,
    height: int,
    width: int,
    k_fraction: float,
    kv_format: str = "bf16",
    rings: int = DENOISING_STEPS,
) -> dict[str, int]:
    """The memory model's KV and statistics bytes of a run (`rings`: one history ring per denoising step)."""
    config = pipe.dit.config
    latent_h, latent_w = height // 8, width // 8
    sizes = {
        "num_layers": config.num_layers,
        "dim": config.dim,
        "sink_tokens": pipe.dit.sink_token_count(latent_h, latent_w),
        "block_tokens": LATENT_FRAMES_PER_BLOCK * pipe.dit.tokens_per_frame(latent_h, latent_w),
        "bytes_per_value": pipe.dit.dtype.itemsize,
        "kv_format": kv_format,
        "heads": config.num_heads,
        "rings": rings,
    }
    return {
        "kv_bytes_full": kv_cache_bytes(**sizes),
        "kv_bytes_ispa_after_warmup": kv_cache_bytes_after_absorb(**sizes, k_fraction=k_fraction),
        "stats_bytes": statistics_nbytes(config.num_layers, config.dim),
    }


def warmup_shares(ispa: dict[str, Any]) -> tuple[float | None, float | None]:
    """(merge, statistics) seconds over DiT seconds in ISPA's warmup blocks that attend to history."""
    rows = [r for r in ispa["blocks"][1:] if r["phase"] == "warmup"]
    dit = sum(r["dit_seconds"] for r in rows)
    merge = sum(r["merge_seconds"] for r in rows)
    stats = sum(r["statistics_seconds"] for r in rows)
    return (_ratio(merge, dit), _ratio(stats, dit)) if rows else (None, None)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    pipe = load(args.model, args.fp8)
    if args.compile:
        set_compiled_regions(pipe)
    request = make_request(args.model, args.blocks, args.seed)
    height, width = pipe.output_size(request.portrait)
    warmup_blocks = math.ceil(args.t_warm / LATENT_FRAMES_PER_BLOCK)
    print(
        f"device: {device_name(pipe.device)}  torch {torch.__version__}  model: {args.model}"
        f"{' fp8' if args.fp8 else ''}  KV: {args.kv_format}  video: {height}x{width}"
        "  (rows as measured; summary at the end)",
        flush=True,
    )
    full = run_policy(
        pipe,
        request,
        FullPolicy(),
        args.blocks,
        warmup_blocks,
        lambda row: print_block_row("Full", row),
        kv_format=args.kv_format,
    )
    ispa = run_policy(
        pipe,
        request,
        ISPAPolicy(k_fraction=args.k_fraction, t_warm=args.t_warm),
        args.blocks,
        warmup_blocks,
        lambda row: print_block_row("ISPA", row),
        kv_format=args.kv_format,
    )
    merge_share, stats_share = warmup_shares(ispa)
    attention = decomposition_seconds(pipe, height, width)
    extra_per_block = (attention["decomposed_seconds"] - attention["plain_seconds"]) * (
        pipe.dit.config.num_layers * DENOISING_STEPS
    )
    result = {
        "device": device_name(pipe.device),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "model": args.model,
        "fp8": args.fp8,
        "compiled": args.compile,
        "kv_format": args.kv_format,
        "dtype": str(pipe.dit.dtype).removeprefix("torch."),
        "video": {"height": height, "width": width},
        "blocks": args.blocks,
        "order": "sequential: Full, then ISPA",
        "k_fraction": args.k_fraction,
        "t_warm": args.t_warm,
        "warmup_blocks": warmup_blocks,
        "full": full,
        "ispa": ispa,
        "warmup_overhead_ratio": merge_share,
        "statistics_overhead_ratio": stats_share,
        "decomposition_overhead_ratio": _ratio(extra_per_block, full["dit_seconds_median"]),
        "attention_decomposition": attention,
        "absorb_seconds": ispa["absorb_seconds"],
        "kv_ratio_after_warmup": _ratio(ispa["kv_bytes_after_warmup"], full["kv_bytes_after_warmup"]),
        "dit_speedup_after_warmup": _ratio(
            full["dit_seconds_median_after_warmup"], ispa["dit_seconds_median_after_warmup"]
        ),
        "predicted": predictions(pipe, height, width, args.k_fraction, args.kv_format),
    }
    print_table(result)
    if args.json:
        print(json.dumps(result))
    return result


def _bytes(value: int | None) -> str:
    if value is None:
        return "n/a"
    return f"{value / 1e9:.2f} GB" if value >= 1e8 else f"{value / 1e6:.3f} MB"


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def print_block_row(policy: str, row: dict[str, Any]) -> None:
    """One block's figures, flushed at once."""
    print(
        f"{policy:<5} block {row['index']:>3}  {row['phase'] + ('*' if row['event'] else ''):<10}"
        f" DiT {row['dit_seconds']:.3f} s  decode {row['decode_seconds']:.3f} s  KV {_bytes(row['kv_bytes'])}"
        f"  statistics {_bytes(row['stats_bytes'])}  absorb {row['absorb_seconds']:.3f} s",
        flush=True,
    )


def print_table(result: dict[str, Any]) -> None:
    video = result["video"]
    print(
        f"device: {result['device']}  date: {result['date']}  model: {result['model']}"
        f"{' fp8' if result['fp8'] else ''} ({result['dtype']})  video: {video['height']}x{video['width']}"
    )
    print(
        f"{result['blocks']} blocks per run, {result['order']}; ISPA k={result['k_fraction']}, "
        f"warmup {result['t_warm']} latent frames = {result['warmup_blocks']} blocks"
    )
    full, ispa = result["full"], result["ispa"]
    print(
        f"{'block':>5}  {'phase (ISPA)':<13}{'DiT s Full':>11}{'DiT s ISPA':>11}{'KV Full':>13}{'KV ISPA':>13}"
    )
    for f, i in zip(full["blocks"], ispa["blocks"], strict=True):
        print(
            f"{f['index']:>5}  {i['phase'] + ('*' if i['event'] else ''):<13}{f['dit_seconds']:>11.3f}"
            f"{i['dit_seconds']:>11.3f}{_bytes(f['kv_bytes']):>13}{_bytes(i['kv_bytes']):>13}"
        )
    rows = [
        ("KV bytes, peak", _bytes, "kv_bytes_peak"),
        ("KV bytes after warmup", _bytes, "kv_bytes_after_warmup"),
        ("statistics bytes, peak", _bytes, "stats_bytes_peak"),
        ("peak allocated (CUDA)", _bytes, "peak_allocated_bytes"),
        ("DiT s/block, median", _number, "dit_seconds_median"),
        ("DiT s/block after warmup", _number, "dit_seconds_median_after_warmup"),
        ("decode s/block, median", _number, "decode_seconds_median"),
        ("FPS (blocks 1..)", _number, "fps"),
        ("FPS after warmup", _number, "fps_after_warmup"),
    ]
    print(f"{'':<28}{'Full':>14}{'ISPA':>14}")
    for label, fmt, key in rows:
        print(f"{label:<28}{fmt(full[key]):>14}{fmt(ispa[key]):>14}")
    predicted = result["predicted"]
    print(
        f"memory model: KV Full {_bytes(predicted['kv_bytes_full'])}, ISPA after warmup "
        f"{_bytes(predicted['kv_bytes_ispa_after_warmup'])}, statistics {_bytes(predicted['stats_bytes'])}"
    )
    print(
        f"KV ISPA/Full after warmup: {_number(result['kv_ratio_after_warmup'])}   "
        f"DiT speed-up after warmup: {_number(result['dit_speedup_after_warmup'])}   "
        f"absorb: {_number(result['absorb_seconds'])} s"
    )
    print(
        f"warmup overhead: LSE merge {_number(result['warmup_overhead_ratio'], 4)}, statistics "
        f"{_number(result['statistics_overhead_ratio'], 4)} of DiT time; same-shape decomposition "
        f"{_number(result['decomposition_overhead_ratio'], 4)} of a Full block"
    )


if __name__ == "__main__":
    main()
