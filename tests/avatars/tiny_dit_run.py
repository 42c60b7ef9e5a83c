"""A tiny LiveAvatar DiT streaming blocks through an `AttentionSession`, for tests that compare plans with live
tensors."""

from __future__ import annotations

import torch

from avatars.liveavatar.dit import LiveAvatarDiT
from avatars.liveavatar.dit.audio_encoder import AudioTokens
from avatars.liveavatar.weights.fp8 import convert_linears_to_fp8
from ispa import AttentionSession, CacheLayout
from ispa.quantized_cache import kv_layer_factory


def run_blocks(config, latent, policy, blocks: int, kv_format: str = "bf16", fp8: bool = False):
    """A bf16 DiT (with FP8 linears if asked) streaming `blocks` blocks of 4 steps through a session; reports and
    the session."""
    torch.manual_seed(0)
    model = LiveAvatarDiT.from_config(config).to(torch.bfloat16).eval()
    if fp8:
        convert_linears_to_fp8(model)
    gen = torch.Generator().manual_seed(1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    layout = CacheLayout(
        block_tokens=3 * model.tokens_per_frame(*latent), history_blocks=3, num_rings=4, frames_per_block=3
    )
    factory = kv_layer_factory(kv_format)
    session = AttentionSession(policy, config.num_layers, layout, kv_layer=factory)
    context = model.embed_text(randn(1, config.text_len, config.text_dim))
    model.prefill_sink(session, randn(1, 16, 1, *latent), randn(1, 16, 19, *latent), context)
    audio = AudioTokens(randn(1, 3, config.num_audio_token + 1, config.dim), randn(1, 3, 1, config.dim))
    reports = []
    for block in range(blocks):
        for step, timestep in enumerate((1000.0, 857.7, 602.2, 8.9)):
            model.forward_block(
                session, randn(1, 16, 3, *latent), timestep, context, audio, 3 * block, step, ref_shift=4
            )
        reports.append(session.end_block())
    return model, session, reports, factory
