"""What each rank holds: the per-rank memory plan (a DiT rank's KV is the sink plus its own rings, the encoders
sit on rank 0, the VAE and its decoder cache where the decode runs), the models each rank loads, and each rank's
GPU checked against its own role's plan before any weight is read."""

from __future__ import annotations

import pytest
import torch

from avatars.liveavatar.block_layout import cache_layout
from avatars.liveavatar.config import PRESETS
from avatars.liveavatar.distributed import RankLayout, load_stage_models
from avatars.liveavatar.distributed.rank_memory import plan_ranks, rank_lightest_plan, role_of_rank
from avatars.liveavatar.dit import LiveAvatarDiT
from avatars.liveavatar.memory_plan import GIB, InsufficientGPUMemoryError, plan_run
from avatars.liveavatar.weights import memory
from ispa import KV_FORMATS

LAYOUTS = [(2, False), (2, True), (3, False), (4, False), (5, False)]


def term(plan, prefix):
    (found,) = [t for t in plan.terms if t.name.startswith(prefix)]
    return found


@pytest.mark.parametrize(("processes", "decoder_on_last_dit"), LAYOUTS)
def test_each_rank_plans_what_its_stage_holds(processes, decoder_on_last_dit):
    layout = RankLayout.for_world(processes, decoder_on_last_dit)
    plans = plan_ranks(704, 384, layout, weights="fp8", kv_format="bf16", policy="full")
    one_gpu = plan_run(704, 384, weights="fp8", kv_format="bf16", policy="full")
    config = PRESETS["14b"]
    with torch.device("meta"):
        dit = LiveAvatarDiT.from_config(config)
    block_tokens = cache_layout(dit.tokens_per_frame(88, 48)).block_tokens
    own_rings = memory.kv_cache_bytes(
        config.num_layers, config.dim, dit.sink_token_count(88, 48), block_tokens, rings=4 // layout.dit_ranks
    )
    assert len(plans) == len({role_of_rank(layout, rank) for rank in range(layout.world_size)})
    for rank in range(layout.world_size):
        plan = plans[role_of_rank(layout, rank)]
        on_dit, decodes = rank < layout.dit_ranks, rank == layout.decoder_rank
        assert term(plan, "KV cache").warmup == (own_rings if on_dit else 0)
        assert term(plan, "DiT weights").warmup == (term(one_gpu, "DiT weights").warmup if on_dit else 0)
        decoder_cache = term(one_gpu, "VAE decoder cache").warmup
        assert term(plan, "VAE decoder cache").warmup == (decoder_cache if decodes else 0)
        if rank == 0:  # the encoders, the VAE among them (it encodes the portrait)
            assert term(plan, "encoders").warmup == term(one_gpu, "encoders").warmup
        else:
            weights = [t.warmup for t in plan.terms if t.name.startswith(("encoders", "VAE weights"))]
            assert weights == [memory.vae_weight_bytes() if decodes else 0]
    # Split over ranks, no rank needs more than the one-GPU run.
    assert max(p.peak_bytes for p in plans.values()) < one_gpu.peak_bytes


@pytest.mark.parametrize("kv_format", KV_FORMATS)
def test_a_dit_rank_kv_is_its_rings_in_every_format(kv_format):
    layout = RankLayout.for_world(5)
    plans = plan_ranks(704, 384, layout, weights="fp8", kv_format=kv_format, policy="full")
    config = PRESETS["14b"]
    with torch.device("meta"):
        dit = LiveAvatarDiT.from_config(config)
    block_tokens = cache_layout(dit.tokens_per_frame(88, 48)).block_tokens
    one_ring = memory.kv_cache_bytes(
        config.num_layers,
        config.dim,
        dit.sink_token_count(88, 48),
        block_tokens,
        rings=1,
        kv_format=kv_format,
        heads=config.num_heads,
    )
    assert term(plans["DiT rank"], "KV cache").warmup == one_ring


def test_the_encoders_are_counted_in_the_dtypes_they_are_loaded_in():
    bf16_everything = 2 * (memory.WAN21_VAE_PARAMS + memory.WAV2VEC2_LARGE_PARAMS)
    # wav2vec2 stays fp32 (AudioEncoder.from_pretrained's default, used by the 14B loader)
    assert (
        memory.encoder_bytes(text_encoder_on_gpu=False) == bf16_everything + 2 * memory.WAV2VEC2_LARGE_PARAMS
    )


@pytest.mark.parametrize(("processes", "decoder_on_last_dit"), LAYOUTS)
def test_a_rank_loads_only_its_stage_models(processes, decoder_on_last_dit):
    layout = RankLayout.for_world(processes, decoder_on_last_dit)
    plans = plan_ranks(704, 384, layout, weights="fp8", kv_format="bf16", policy="full")
    for rank in range(1, layout.world_size):
        models = load_stage_models("tiny", layout, rank, fp8=False)
        plan = plans[role_of_rank(layout, rank)]
        assert (models.dit is not None) == (rank < layout.dit_ranks) == (term(plan, "DiT weights").warmup > 0)
        assert (models.vae is not None) == (rank == layout.decoder_rank)
        assert models.device == torch.device("cpu")
    with pytest.raises(ValueError, match="rank 0 loads the whole pipeline"):
        load_stage_models("tiny", layout, 0, fp8=False)


def test_each_rank_gpu_is_checked_against_its_own_role(monkeypatch):
    free = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 * GIB))
    monkeypatch.setenv("ISPA_WEIGHTS", "/nonexistent")
    layout = RankLayout.for_world(5)
    dit_rank = rank_lightest_plan(layout, 1, weights="fp8")
    decoder_rank = rank_lightest_plan(layout, 4, weights="fp8")
    assert decoder_rank.peak_bytes < 3 * GIB < dit_rank.peak_bytes
    free["bytes"] = 6 * GIB
    with pytest.raises(InsufficientGPUMemoryError, match=r"Fake GPU \(DiT rank\).*only 6.00 GiB is free"):
        load_stage_models("14b", layout, 1, fp8=True)
    # The decoder rank needs no room for a DiT: it passes the check and only then finds no weights here.
    with pytest.raises(RuntimeError, match="LiveAvatar 14B cannot run here: weights not found"):
        load_stage_models("14b", layout, 4, fp8=True)
