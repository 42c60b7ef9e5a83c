"""The per-rank memory plan: a DiT rank's KV is the sink plus its own rings, the decoder cache sits on one rank."""

from __future__ import annotations

import pytest
import torch

from avatars.liveavatar.block_layout import cache_layout
from avatars.liveavatar.config import PRESETS
from avatars.liveavatar.distributed import RankLayout
from avatars.liveavatar.distributed.memory_per_rank import plan_ranks
from avatars.liveavatar.dit import LiveAvatarDiT
from avatars.liveavatar.memory_plan import plan_run
from avatars.liveavatar.weights import memory


def term(plan, prefix):
    (found,) = [t for t in plan.terms if t.name.startswith(prefix)]
    return found


@pytest.mark.parametrize("processes", [2, 3, 5])
def test_dit_rank_kv_is_the_sink_plus_its_rings(processes):
    layout = RankLayout.for_world(processes)
    plans = plan_ranks(704, 384, layout, weights="fp8", kv_format="bf16", policy="full")
    config = PRESETS["14b"]
    with torch.device("meta"):
        dit = LiveAvatarDiT.from_config(config)
    block_tokens = cache_layout(dit.tokens_per_frame(88, 48)).block_tokens
    own_rings = memory.kv_cache_bytes(
        config.num_layers, config.dim, dit.sink_token_count(88, 48), block_tokens, rings=4 // layout.dit_ranks
    )
    assert term(plans["DiT rank"], "KV cache").warmup == own_rings
    one_gpu = plan_run(704, 384, weights="fp8", kv_format="bf16", policy="full")
    decoder = term(one_gpu, "VAE decoder cache").warmup
    assert term(plans["DiT rank"], "VAE decoder cache").warmup == 0
    assert term(plans["decoder rank"], "VAE decoder cache").warmup == decoder
    assert term(plans["decoder rank"], "KV cache").warmup == 0
