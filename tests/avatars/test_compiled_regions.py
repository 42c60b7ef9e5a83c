"""Regional torch.compile of the DiT (inductor on CPU): the same flows as eager, and no recompilation over 8 blocks
that include the absorb and the switch of layers to local."""

from __future__ import annotations

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from avatars.liveavatar.compiled import DIT_REGIONS, set_compiled_dit
from avatars.liveavatar.config import PRESETS
from avatars.liveavatar.dit import LiveAvatarDiT
from avatars.liveavatar.dit.audio_encoder import AudioTokens
from ispa import AttentionSession, CacheLayout, ISPAPolicy

LATENT = (8, 8)
BLOCKS = 8  # warmup 2 blocks (t_warm 6), absorb at the end of block 1, then 6 absorbed blocks
TIMESTEPS = (1000.0, 857.7, 602.2, 8.9)


def _flows(
    model: LiveAvatarDiT, compiled_after_block: int | None = None
) -> tuple[list[torch.Tensor], list[str]]:
    """Every flow of a BLOCKS-block ISPA run; with `compiled_after_block`, recompiling after it raises."""
    config = model.config
    gen = torch.Generator().manual_seed(1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    layout = CacheLayout(
        block_tokens=3 * model.tokens_per_frame(*LATENT), history_blocks=3, num_rings=4, frames_per_block=3
    )
    session = AttentionSession(ISPAPolicy(k_fraction=0.5, t_warm=6), config.num_layers, layout)
    context = model.embed_text(randn(1, config.text_len, config.text_dim))
    model.prefill_sink(session, randn(1, 16, 1, *LATENT), randn(1, 16, 19, *LATENT), context)
    audio = AudioTokens(randn(1, 3, config.num_audio_token + 1, config.dim), randn(1, 3, 1, config.dim))
    flows, events = [], []
    for block in range(BLOCKS):
        strict = compiled_after_block is not None and block > compiled_after_block
        with torch._dynamo.config.patch(error_on_recompile=strict):
            for step, timestep in enumerate(TIMESTEPS):
                latents = randn(1, 16, 3, *LATENT)
                flows.append(
                    model.forward_block(session, latents, timestep, context, audio, 3 * block, step, 4)
                )
        events.append(session.end_block().event)
    session.close()
    return flows, events


def test_compiled_regions_match_eager_and_never_recompile():
    torch.manual_seed(0)
    model = LiveAvatarDiT.from_config(PRESETS["tiny"]).eval()  # fp32
    eager, events = _flows(model)
    assert "absorbed" in events[:2]

    torch._dynamo.reset()
    counters.clear()
    set_compiled_dit(model)
    try:
        compiled, compiled_events = _flows(model, compiled_after_block=0)
    finally:
        set_compiled_dit(model, False)

    assert compiled_events == events
    for got, want in zip(compiled, eager, strict=True):
        assert ((got - want).norm() / want.norm()).item() <= 1e-5
    # One graph per region, shared by all 4 blocks (or both audio injections) and all 32 forwards.
    assert counters["stats"]["unique_graphs"] == len(DIT_REGIONS)


def test_eager_again_after_compiled_regions_are_switched_off():
    model = LiveAvatarDiT.from_config(PRESETS["tiny"])
    block = model.blocks[0]
    set_compiled_dit(model)
    assert "attention_input" in vars(block) and "project_local" in vars(block.self_attn)
    set_compiled_dit(model, False)
    assert not {"attention_input", "after_attention"} & set(vars(block))
    assert "project_local" not in vars(block.self_attn) and "prefill_sink" not in vars(model)
