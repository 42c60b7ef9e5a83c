"""One DiT block through the ISPA engine (Full policy, sink + history) equals a plain reference block that
concatenates [roped sink; history; current] keys and uses explicit softmax attention. Also: the sink prefill
stores un-rotated keys, and the audio injector equals a plain reference."""

import copy
from functools import partial

import torch
import torch.nn.functional as F

from avatars.liveavatar.config import PRESETS
from avatars.liveavatar.dit import AudioTokens, TextContext
from avatars.liveavatar.dit.attention import SinkPrefillAttention, StreamingAttention
from avatars.liveavatar.dit.audio_injector import AudioInjector
from avatars.liveavatar.dit.blocks import TransformerBlock
from avatars.liveavatar.dit.positions import block_positions, ref_time, sink_positions
from avatars.liveavatar.dit.rope import rope_angles
from ispa import AttentionSession, CacheLayout, FullPolicy

CONFIG = PRESETS["tiny"]
DIM, HEADS, HEAD_DIM = CONFIG.dim, CONFIG.num_heads, CONFIG.head_dim
HEIGHT = WIDTH = 4  # token grid of a 64×64 video
FRAMES = 3
BLOCK_TOKENS = FRAMES * HEIGHT * WIDTH


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights that keep activations O(1): matrices scaled by 1/sqrt(fan-in), vectors around 0 (biases,
    modulation) or 1 (norm scales)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2 and "modulation" not in name:
                p.copy_(noise / p.shape[1] ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)


# ---- plain reference --------------------------------------------------------------------------------------


def _rope(x, positions):
    """Complex-number RoPE with Wan's pair split, float64."""
    pairs = HEAD_DIM // 2
    split = [pairs - 2 * (pairs // 3), pairs // 3, pairs // 3]
    angles = []
    for axis, n in enumerate(split):
        inv_freq = 10000.0 ** (-torch.arange(n, dtype=torch.float64) * 2 / (2 * n))
        angles.append(positions[:, axis : axis + 1].double() * inv_freq)
    phasor = torch.polar(torch.ones(1, dtype=torch.float64), torch.cat(angles, 1))[:, None]
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * phasor).reshape(x.shape).to(x.dtype)


def _rms(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight


def _softmax_attention(q, k, v):  # [B, L, H, D]
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / HEAD_DIM**0.5
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v)


def _linear(layer, x):
    return x @ layer.weight.T + layer.bias


def _heads(x):
    return x.reshape(*x.shape[:2], HEADS, HEAD_DIM)


def _reference_block(block, x, modulation, context, sink_k, sink_v, history, frame_index, ref_shift):
    """Returns the block output and the current block's (roped k, v) for later history."""
    e = block.modulation[None] + modulation  # [B, F, 6, dim]
    per_token = e.repeat_interleave(HEIGHT * WIDTH, dim=1)  # [B, L, 6, dim]
    shift1, scale1, gate1, shift2, scale2, gate2 = per_token.unbind(2)
    ln = lambda t: F.layer_norm(t, (DIM,), eps=1e-6)  # noqa: E731

    h = ln(x) * (1 + scale1) + shift1
    attn = block.self_attn
    q = _heads(_rms(_linear(attn.q, h), attn.norm_q.weight))
    k = _heads(_rms(_linear(attn.k, h), attn.norm_k.weight))
    v = _heads(_linear(attn.v, h))
    q = _rope(q, block_positions(frame_index, FRAMES, HEIGHT, WIDTH))
    k = _rope(k, block_positions(frame_index, FRAMES, HEIGHT, WIDTH))
    roped_sink = _rope(sink_k, sink_positions(HEIGHT, WIDTH, ref_time(frame_index, ref_shift)))
    keys = torch.cat([roped_sink, *(hk for hk, _ in history), k], dim=1)
    values = torch.cat([sink_v, *(hv for _, hv in history), v], dim=1)
    y = _linear(attn.o, _softmax_attention(q, keys, values).flatten(2))
    x = x + y * gate1

    cross = block.cross_attn
    hq = ln(x) * block.norm3.weight + block.norm3.bias
    cq = _heads(_rms(_linear(cross.q, hq), cross.norm_q.weight))
    ck = _heads(_rms(_linear(cross.k, context), cross.norm_k.weight))
    cv = _heads(_linear(cross.v, context))
    x = x + _linear(cross.o, _softmax_attention(cq, ck, cv).flatten(2))

    h = ln(x) * (1 + scale2) + shift2
    y = _linear(block.ffn[2], F.gelu(_linear(block.ffn[0], h), approximate="tanh"))
    return x + y * gate2, (k, v)


# ---- tests ------------------------------------------------------------------------------------------------


def test_full_policy_block_equals_the_plain_reference():
    torch.manual_seed(0)
    block = TransformerBlock(DIM, CONFIG.ffn_dim, HEADS, CONFIG.eps)
    _randomize(block, seed=1)
    ref_block = copy.deepcopy(block).double()  # the reference runs in float64
    sink_tokens = 40
    sink_k = torch.randn(2, sink_tokens, HEADS, HEAD_DIM)
    sink_v = torch.randn(2, sink_tokens, HEADS, HEAD_DIM)
    context = torch.randn(2, CONFIG.text_len, DIM)
    layout = CacheLayout(block_tokens=BLOCK_TOKENS, history_blocks=3, num_rings=2, frames_per_block=FRAMES)
    session = AttentionSession(FullPolicy(), num_layers=1, layout=layout)
    session.write_sink(0, sink_k, sink_v)

    history: list[tuple[torch.Tensor, torch.Tensor]] = []
    ring, ref_shift = 1, 28  # the reference rolls: RoPE time 30, 31, 34 for frames 0, 3, 6
    with torch.no_grad():
        for block_index in range(3):  # two blocks of history, then the block under test
            frame_index = FRAMES * block_index
            x = torch.randn(2, BLOCK_TOKENS, DIM)
            modulation = 0.5 * torch.randn(2, FRAMES, 6, DIM)
            attention = StreamingAttention(
                session,
                ring,
                rope_angles(block_positions(frame_index, FRAMES, HEIGHT, WIDTH), HEAD_DIM),
                rope_angles(sink_positions(HEIGHT, WIDTH, ref_time(frame_index, ref_shift)), HEAD_DIM),
            )
            ours = block(x, modulation, TextContext(context), partial(attention, layer=0))
            expected, current = _reference_block(
                ref_block,
                x.double(),
                modulation.double(),
                context.double(),
                sink_k.double(),
                sink_v.double(),
                history,
                frame_index,
                ref_shift,
            )
            history.append(current)
            session.end_block()
            error = (ours.double() - expected).abs().max().item()
            assert error <= 1e-5, error
    # The history really took part: without it the block's output differs.
    alone, _ = _reference_block(
        ref_block,
        x.double(),
        modulation.double(),
        context.double(),
        sink_k.double(),
        sink_v.double(),
        [],
        frame_index,
        ref_shift,
    )
    assert (alone - expected).abs().max().item() > 1e-3


def test_sink_prefill_stores_unrotated_normalised_keys_and_values():
    torch.manual_seed(0)
    block = TransformerBlock(DIM, CONFIG.ffn_dim, HEADS, CONFIG.eps)
    _randomize(block, seed=2)
    session = AttentionSession(
        FullPolicy(), num_layers=2, layout=CacheLayout(block_tokens=BLOCK_TOKENS, history_blocks=3)
    )
    angles = rope_angles(sink_positions(HEIGHT, WIDTH, 30), HEAD_DIM)
    normed = torch.randn(1, 40, DIM)
    with torch.no_grad():
        y = SinkPrefillAttention(session, angles)(block.self_attn, normed, layer=1)
        k, v = session.sink(1)
        attn = block.self_attn
        expected_k = _heads(_rms(_linear(attn.k, normed), attn.norm_k.weight))
        expected_q = _heads(_rms(_linear(attn.q, normed), attn.norm_q.weight))
        expected_v = _heads(_linear(attn.v, normed))
        positions = sink_positions(HEIGHT, WIDTH, 30)
        within = _softmax_attention(_rope(expected_q, positions), _rope(expected_k, positions), expected_v)
    torch.testing.assert_close(k, expected_k, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(v, expected_v, rtol=1e-6, atol=1e-6)
    assert (y - _linear(attn.o, within.flatten(2))).abs().max().item() <= 1e-5
    assert y.shape == (1, 40, DIM)


def test_audio_injector_equals_the_plain_reference():
    injector = AudioInjector(DIM, HEADS, num_injections=2, eps=CONFIG.eps)
    _randomize(injector, seed=3)
    x = torch.randn(2, BLOCK_TOKENS, DIM)
    audio = AudioTokens(tokens=torch.randn(2, FRAMES, 5, DIM), global_token=torch.randn(2, FRAMES, 1, DIM))
    with torch.no_grad():
        ours = injector(1, x, audio)
        adain, cross = injector.injector_adain_layers[1], injector.injector[1]
        expected = []
        for b in range(2):
            for f in range(FRAMES):
                tokens = x[b, f * 16 : (f + 1) * 16][None]  # one latent frame's tokens
                shift, scale = _linear(adain.linear, F.silu(audio.global_token[b, f])).chunk(2, dim=-1)
                q_in = F.layer_norm(tokens, (DIM,), eps=1e-5) * (1 + scale) + shift
                q = _heads(_rms(_linear(cross.q, q_in), cross.norm_q.weight))
                k = _heads(_rms(_linear(cross.k, audio.tokens[b, f][None]), cross.norm_k.weight))
                v = _heads(_linear(cross.v, audio.tokens[b, f][None]))
                expected.append(tokens + _linear(cross.o, _softmax_attention(q, k, v).flatten(2)))
        expected = torch.cat(expected, dim=1).reshape(2, BLOCK_TOKENS, DIM)
    assert (ours - expected).abs().max().item() <= 1e-5
