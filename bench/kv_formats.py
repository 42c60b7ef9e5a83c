"""How much each KV format changes attention, a layer at a time and over a whole tiny-model run.

    python -m bench.kv_formats [--json]

1. Synthetic keys and values shaped like LiveAvatar's heads (128 wide), keys with a few outlier channels and
   per-channel offsets as real key caches have: relative error of the merged attention output (local keys plus
   the quantized history, fused by LSE as the session does) for every codec, including the ones not chosen.
2. The tiny DiT's own queries, keys and values, captured per layer from a Full bf16 session: the same error per
   layer for each codec, and for `fp8-all`, whose sink is stored in fp8 too: its raw (pre-RoPE) sink is quantized,
   dequantized and rotated with the forward's own sink angles, exactly as the engine would.
3. Drift of whole runs against bf16 KV, same inputs and seeds: max abs difference of the tiny DiT's outputs over
   all blocks and steps, and the PSNR of the tiny pipeline's frames.
4. Every stored format as a real KV layer holds it (q2's sink, the residual windows of int4+w and q2+w included),
   on the DiT's own activations: bytes of one layer (sink + three blocks of ring 0) against bf16, relative error of
   the history keys and values, and of the merged attention output. Twice: on the tiny DiT, and on one layer at the
   14B's real widths (5,120 wide, 40 heads x 128) with random weights at a 128x128 video (192-token blocks).

Everything runs on the CPU with random weights: it measures what the storage does to attention, never visual
quality with the real weights.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from avatars.base import GenerationRequest
from avatars.liveavatar.config import PRESETS
from avatars.liveavatar.dit import LiveAvatarDiT
from avatars.liveavatar.dit.audio_encoder import AudioTokens
from avatars.liveavatar.dit.positions import ref_time, sink_positions
from avatars.liveavatar.dit.rope import RotaryAngles, apply_rope, rope_angles
from avatars.liveavatar.loading import build_tiny_pipeline
from ispa import AttentionSession, CacheLayout, FullPolicy, attention_with_lse, merge_attention
from ispa.kv_codec_q2 import Q2Codec
from ispa.kv_codecs import BlockCodec, Fp8ChannelCodec, Fp8TokenCodec, Int4Codec
from ispa.quantized_cache import KV_FORMATS, kv_layer_factory, quantizes_sink

FP8_ALL = "fp8-all (fp8 history and sink, token scales)"
CODEC_PAIRS: dict[str, tuple[BlockCodec, BlockCodec]] = {  # (keys, values); the chosen formats come first
    "fp8 (token scales, chosen)": (Fp8TokenCodec(), Fp8TokenCodec()),
    "fp8 (channel scales for K)": (Fp8ChannelCodec(), Fp8TokenCodec()),
    "int4 KIVI (K per channel/32 tokens, V per token/32 ch, chosen)": (
        Int4Codec("tokens", 32),
        Int4Codec("channels", 32),
    ),
    "int4 per token (K and V per token/32 ch)": (Int4Codec("channels", 32), Int4Codec("channels", 32)),
    "q2 history (k-means smoothing + two 1-bit stages, chosen)": (Q2Codec(), Q2Codec()),
}


def roundtrip(codec: BlockCodec, x: Tensor, block_tokens: int) -> Tensor:
    """`x` [B, T, H, D] stored block by block in `codec` and dequantized, as a quantized ring would hold it."""
    out = torch.empty_like(x)
    for start in range(0, x.shape[1], block_tokens):
        span = slice(start, start + block_tokens)
        codec.decode_into(codec.encode(x[:, span]), out[:, span])
    return out


def merged_attention(q: Tensor, local_k: Tensor, local_v: Tensor, hist_k: Tensor, hist_v: Tensor) -> Tensor:
    out_loc, lse_loc = attention_with_lse(q, local_k, local_v)
    out_hist, lse_hist = attention_with_lse(q, hist_k, hist_v)
    return merge_attention(out_loc, lse_loc, out_hist, lse_hist)[0]


def relative_error(got: Tensor, want: Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def output_error(
    pair: tuple[BlockCodec, BlockCodec],
    captured: tuple[Tensor, ...],
    block_tokens: int,
    stored_local: tuple[Tensor, Tensor] | None = None,
) -> float:
    """Relative error of the merged attention output when the history is stored with `pair` (and the local keys
    and values are `stored_local`, when the sink is stored quantized too)."""
    q, local_k, local_v, hist_k, hist_v = captured
    want = merged_attention(q, local_k, local_v, hist_k, hist_v)
    got_k, got_v = stored_local or (local_k, local_v)
    got = merged_attention(
        q,
        got_k,
        got_v,
        roundtrip(pair[0], hist_k, block_tokens),
        roundtrip(pair[1], hist_v, block_tokens),
    )
    return relative_error(got, want)


def synthetic_heads(seed: int, outliers: float, block_tokens: int = 256) -> tuple[Tensor, ...]:
    """Queries, local and history keys/values [1, T, 8, 128] in bf16; `outliers` scales 4 key channels."""
    gen = torch.Generator().manual_seed(seed)
    heads, dim = 8, 128

    def keys(tokens: int) -> Tensor:
        k = torch.randn(1, tokens, heads, dim, generator=gen) + offset
        k[..., :4] *= outliers
        return k

    offset = 0.5 * torch.randn(heads, dim, generator=gen)  # per-channel means, as after RoPE'd projections
    q = torch.randn(1, block_tokens, heads, dim, generator=gen)
    local = 64 + block_tokens
    hist = 3 * block_tokens
    values = [torch.randn(1, n, heads, dim, generator=gen) for n in (local, hist)]
    return tuple(t.to(torch.bfloat16) for t in (q, keys(local), values[0], keys(hist), values[1]))


class CapturingSession(AttentionSession):
    """A Full session that keeps a copy of what ring 0's attention saw per layer in block `capture_block`, and
    each layer's raw (pre-RoPE) sink."""

    def __init__(self, *args, capture_block: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.capture_block = capture_block
        self.captured: dict[int, tuple[Tensor, ...]] = {}
        self.raw_sinks: dict[int, tuple[Tensor, Tensor]] = {}

    def self_attention(self, layer, q, local_k, local_v, new_k, new_v, out_proj, ring=0):
        if self.block_index == self.capture_block and ring == 0:
            hist_k, hist_v = self.cache.layers[layer].history(ring)
            self.captured[layer] = tuple(t.clone() for t in (q, local_k, local_v, hist_k, hist_v))
            self.raw_sinks[layer] = tuple(t.clone() for t in self.cache.layers[layer].sink())
        return super().self_attention(layer, q, local_k, local_v, new_k, new_v, out_proj, ring)


@dataclass
class TinyDiTRun:
    """Streams `blocks` blocks of 4 steps through the tiny bf16 DiT with fixed random inputs."""

    blocks: int = 4
    latent: tuple[int, int] = (16, 8)
    seed: int = 0
    ref_shift: int = 4
    config_name: str = "tiny"
    num_layers: int | None = None  # keep only the first layers (the real-dims run keeps one)
    steps: int = 4  # denoising steps per block (ring s is written by step s)

    @property
    def config(self):
        config = PRESETS[self.config_name]
        if self.num_layers is None:
            return config
        inject = tuple(i for i in config.audio_inject_layers if i < self.num_layers) or (0,)
        return replace(config, num_layers=self.num_layers, audio_inject_layers=inject)

    def sink_angles(self, block: int) -> RotaryAngles:
        """The RoPE angles `forward_block` gives the sink in block `block` (the rolling reference)."""
        config = self.config
        height, width = (side // config.patch_size[1] for side in self.latent)
        positions = sink_positions(height, width, ref_time(3 * block, self.ref_shift), torch.device("cpu"))
        return rope_angles(positions, config.head_dim)

    def run(self, session_factory) -> tuple[AttentionSession, list[Tensor]]:
        config = self.config
        torch.manual_seed(self.seed)
        model = LiveAvatarDiT.from_config(config).to(torch.bfloat16).eval()
        gen = torch.Generator().manual_seed(self.seed + 1)

        def randn(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=gen)

        layout = CacheLayout(
            block_tokens=3 * model.tokens_per_frame(*self.latent),
            history_blocks=3,
            num_rings=4,
            frames_per_block=3,
        )
        session = session_factory(config.num_layers, layout)
        context = model.embed_text(randn(1, config.text_len, config.text_dim))
        with torch.no_grad():
            model.prefill_sink(
                session, randn(1, 16, 1, *self.latent), randn(1, 16, 19, *self.latent), context
            )
            audio = AudioTokens(
                randn(1, 3, config.num_audio_token + 1, config.dim), randn(1, 3, 1, config.dim)
            )
            outputs = []
            for block in range(self.blocks):
                latents = randn(1, 16, 3, *self.latent)
                for step, timestep in enumerate((1000.0, 857.7, 602.2, 8.9)[: self.steps]):
                    latents = model.forward_block(
                        session, latents, timestep, context, audio, 3 * block, step, ref_shift=self.ref_shift
                    )
                    outputs.append(latents.float())
                session.end_block()
        return session, outputs


def tiny_layer_errors(blocks: int = 4) -> tuple[dict[str, list[float]], int]:
    """Per-layer merged-output error of each codec pair on the tiny DiT's own q/k/v (last block, ring 0)."""
    holder = {}

    def factory(num_layers, layout):
        holder["session"] = CapturingSession(FullPolicy(), num_layers, layout, capture_block=blocks - 1)
        holder["layout"] = layout
        return holder["session"]

    run = TinyDiTRun(blocks=blocks)
    run.run(factory)
    session, block_tokens = holder["session"], holder["layout"].block_tokens
    captured = session.captured
    errors = {}
    for name, (key_codec, value_codec) in CODEC_PAIRS.items():
        pair = (_fit(key_codec, block_tokens), _fit(value_codec, block_tokens))
        errors[name] = [output_error(pair, captured[layer], block_tokens) for layer in sorted(captured)]
    angles = run.sink_angles(blocks - 1)
    errors[FP8_ALL] = [
        output_error(
            CODEC_PAIRS["fp8 (token scales, chosen)"],
            captured[n],
            block_tokens,
            stored_local=with_fp8_sink(captured[n], session.raw_sinks[n], angles),
        )
        for n in sorted(captured)
    ]
    return errors, block_tokens


def with_fp8_sink(
    captured: tuple[Tensor, ...], raw_sink: tuple[Tensor, Tensor], angles: RotaryAngles
) -> tuple[Tensor, Tensor]:
    """The captured local keys and values with the sink as an `fp8-all` layer gives it to attention: the raw sink
    stored in fp8 (token scales), dequantized, and its keys rotated with this forward's sink angles."""
    codec = Fp8TokenCodec()
    k, v = torch.empty_like(raw_sink[0]), torch.empty_like(raw_sink[1])
    codec.decode_into(codec.encode(raw_sink[0]), k)
    codec.decode_into(codec.encode(raw_sink[1]), v)
    return with_stored_sink(captured, raw_sink, (k, v), angles)


def with_stored_sink(
    captured: tuple[Tensor, ...],
    raw_sink: tuple[Tensor, Tensor],
    stored_sink: tuple[Tensor, Tensor],
    angles: RotaryAngles,
) -> tuple[Tensor, Tensor]:
    """The captured local keys and values with the sink replaced by `stored_sink` (the raw sink as a storage
    returns it), its keys rotated with this forward's sink angles as the model does."""
    _, local_k, local_v, _, _ = captured
    raw_k, _ = raw_sink
    sink = raw_k.shape[1]
    if not torch.equal(apply_rope(raw_k, angles), local_k[:, :sink]):
        raise RuntimeError("the sink angles do not reproduce the captured sink keys")
    k, v = stored_sink
    local_k, local_v = local_k.clone(), local_v.clone()
    apply_rope(k, angles, out=local_k[:, :sink])
    local_v[:, :sink] = v
    return local_k, local_v


def _fit(codec: BlockCodec, block_tokens: int) -> BlockCodec:
    """The codec with its token group shrunk to tile the tiny model's blocks (as `int4_key_group` does)."""
    if isinstance(codec, Int4Codec) and codec.axis == "tokens" and block_tokens % codec.group:
        group = max(g for g in range(2, codec.group + 1) if block_tokens % g == 0)
        return Int4Codec("tokens", group)
    if isinstance(codec, Int4Codec) and codec.axis == "channels":
        return Int4Codec("channels", 16)  # the tiny model's heads are 16 wide
    return codec


def dit_drift(kv_format: str, blocks: int = 4) -> tuple[float, float]:
    """Max abs difference of the tiny DiT's outputs (every block and step) against a bf16-KV run, and the bf16
    run's own max abs for scale."""

    def session_in(fmt):
        return lambda n, layout: AttentionSession(FullPolicy(), n, layout, kv_layer=kv_layer_factory(fmt))

    _, reference = TinyDiTRun(blocks=blocks).run(session_in("bf16"))
    _, outputs = TinyDiTRun(blocks=blocks).run(session_in(kv_format))
    drift = max((a - b).abs().max().item() for a, b in zip(outputs, reference, strict=True))
    return drift, max(r.abs().max().item() for r in reference)


def frames_psnr(kv_format: str, seconds: float = 2.0) -> tuple[float, int]:
    """PSNR (dB) of the tiny pipeline's frames with `kv_format` against bf16 KV, and the frame count."""
    pipe = build_tiny_pipeline()
    rng = np.random.default_rng(0)
    portrait = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    t = np.arange(int(16000 * seconds)) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    request = GenerationRequest(portrait=portrait, audio=audio, sample_rate=16000, seed=1)

    def frames(fmt: str) -> np.ndarray:
        return np.concatenate([c.frames for c in pipe.stream(replace(request, kv_format=fmt))])

    want, got = frames("bf16").astype(np.float64), frames(kv_format).astype(np.float64)
    mse = float(np.mean((want - got) ** 2))
    return (math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)), len(want)


def captured_run(run: TinyDiTRun) -> tuple[CapturingSession, CacheLayout, RotaryAngles]:
    """`run` through a Full bf16 session that captures ring 0 of its last block; the session, layout and the sink
    angles of that block."""
    holder = {}

    def factory(num_layers, layout):
        holder["session"] = CapturingSession(FullPolicy(), num_layers, layout, capture_block=run.blocks - 1)
        holder["layout"] = layout
        return holder["session"]

    run.run(factory)
    return holder["session"], holder["layout"], run.sink_angles(run.blocks - 1)


def storage_errors(session: CapturingSession, layout: CacheLayout, angles: RotaryAngles) -> dict[str, dict]:
    """Per format, averaged over the captured layers: a layer's bytes (sink + ring 0's history) as a fraction of
    bf16's, and the relative error of the history keys, values and the merged attention output, with every part
    stored by a real KV layer of that format (its sink, window and codecs)."""
    results = {}
    for kv_format in KV_FORMATS[1:]:
        rows = []
        for index in sorted(session.captured):
            captured = session.captured[index]
            q, local_k, local_v, hist_k, hist_v = captured
            layers = {fmt: kv_layer_factory(fmt)(replace(layout, num_rings=1)) for fmt in ("bf16", kv_format)}
            for layer in layers.values():
                layer.write_sink(*session.raw_sinks[index])
                for start in range(0, hist_k.shape[1], layout.block_tokens):
                    span = slice(start, start + layout.block_tokens)
                    layer.append(0, hist_k[:, span], hist_v[:, span])
            layer = layers[kv_format]
            got_k, got_v = (t.clone() for t in layer.history(0))
            stored_local = (
                with_stored_sink(captured, session.raw_sinks[index], layer.sink(), angles)
                if quantizes_sink(kv_format)
                else (local_k, local_v)
            )
            got = merged_attention(q, *stored_local, got_k, got_v)
            want = merged_attention(q, local_k, local_v, hist_k, hist_v)
            rows.append(
                (
                    layer.nbytes() / layers["bf16"].nbytes(),
                    relative_error(got_k, hist_k),
                    relative_error(got_v, hist_v),
                    relative_error(got, want),
                )
            )
        keys = ("bytes_vs_bf16", "key_error", "value_error", "output_error")
        results[kv_format] = {key: sum(row[i] for row in rows) / len(rows) for i, key in enumerate(keys)}
    return results


REAL_DIMS = TinyDiTRun(blocks=4, latent=(16, 16), config_name="14b", num_layers=1, steps=1)


def measure() -> dict[str, object]:
    tiny_storage = storage_errors(*captured_run(TinyDiTRun()))
    real_storage = storage_errors(*captured_run(REAL_DIMS))
    synthetic = {
        f"outliers x{scale:g}": {
            name: output_error(pair, synthetic_heads(seed=3, outliers=scale), 256)
            for name, pair in CODEC_PAIRS.items()
        }
        for scale in (1.0, 10.0, 30.0)
    }
    layers, block_tokens = tiny_layer_errors()
    quantized = [f for f in KV_FORMATS if f != "bf16"]
    return {
        "synthetic_output_error": synthetic,
        "tiny_layer_output_error": layers,
        "tiny_block_tokens": block_tokens,
        "tiny_dit_max_abs_drift": {fmt: dit_drift(fmt)[0] for fmt in quantized},
        "tiny_dit_max_abs_output": dit_drift("bf16")[1],
        "tiny_pipeline_frames_psnr_db": {fmt: frames_psnr(fmt)[0] for fmt in quantized},
        "tiny_storage": tiny_storage,
        "real_dims_random_weights_storage": real_storage,
    }


def render(result: dict[str, object]) -> list[str]:
    lines = ["device: CPU, tiny model with random weights; errors are ||out - out_bf16|| / ||out_bf16||"]
    for case, errors in result["synthetic_output_error"].items():
        lines.append(f"synthetic, key {case}:")
        lines += [f"  {name:<66} {error:.4%}" for name, error in errors.items()]
    lines.append(f"tiny DiT, per layer (block of {result['tiny_block_tokens']} tokens):")
    for name, errors in result["tiny_layer_output_error"].items():
        lines.append(f"  {name:<66} " + "  ".join(f"{e:.4%}" for e in errors))
    for fmt, drift in result["tiny_dit_max_abs_drift"].items():
        psnr = result["tiny_pipeline_frames_psnr_db"][fmt]
        scale = result["tiny_dit_max_abs_output"]
        lines.append(
            f"whole run, {fmt} vs bf16 KV: DiT output max abs diff {drift:.4g} (outputs up to {scale:.3g}), "
            f"frames PSNR {psnr:.2f} dB"
        )
    for key, title in (
        ("tiny_storage", "tiny DiT, each format as a KV layer stores it (mean of 4 layers)"),
        (
            "real_dims_random_weights_storage",
            "one layer at the 14B's widths, RANDOM WEIGHTS, 192-token blocks",
        ),
    ):
        lines.append(f"{title}: bytes vs bf16, error of history K / V / attention output")
        for fmt, row in result[key].items():
            lines.append(
                f"  {fmt:<8} {row['bytes_vs_bf16']:7.2%}  K {row['key_error']:.4%}  V {row['value_error']:.4%}  "
                f"out {row['output_error']:.4%}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kv_formats", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = measure()
    print("\n".join(render(result)))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
