"""What each GPU of a run holds: the per-role memory plan (a DiT rank's KV is the sink plus its own rings, the
encoders sit on rank 0, the VAE and its decoder cache where the decode runs), found by each term's kind and roles and
never by its label; the models each rank loads match its plan, and each rank's GPU is checked against its own
role's plan before any weight is read."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from avatars.liveavatar.block_layout import cache_layout
from avatars.liveavatar.config import PRESETS
from avatars.liveavatar.distributed import load_stage_models
from avatars.liveavatar.dit import LiveAvatarDiT
from avatars.liveavatar.memory_plan import (
    InsufficientGPUMemoryError,
    Role,
    lightest_plan,
    plan_roles,
    plan_terms,
    role_of_rank,
    roles_of,
)
from avatars.liveavatar.memory_plan import terms as memory
from avatars.liveavatar.rank_layout import RankLayout
from avatars.memory import GIB, MemoryPlan, Term, TermKind
from ispa import KV_FORMATS, LIGHTEST_KV_FORMAT, FullPolicy, ISPAPolicy

LAYOUTS = [(2, False), (2, True), (3, False), (4, False), (5, False)]
FULL_BF16 = {"model": "14b", "weights": "fp8", "kv_format": "bf16", "policy": FullPolicy()}


def term(plan: MemoryPlan, *kinds: TermKind) -> Term:
    (found,) = [t for t in plan.terms if t.kind in kinds]
    return found


def own_rings_kv(layout: RankLayout, kv_format: str = "bf16") -> int:
    """A DiT rank's KV at 704×384 by the engine's arithmetic: every layer's sink plus its 4/N steps' rings."""
    config = PRESETS["14b"]
    with torch.device("meta"):
        dit = LiveAvatarDiT.from_config(config)
    block_tokens = cache_layout(dit.tokens_per_frame(88, 48)).block_tokens
    return memory.kv_cache_bytes(
        config.num_layers,
        config.dim,
        dit.sink_token_count(88, 48),
        block_tokens,
        rings=4 // layout.dit_ranks,
        kv_format=kv_format,
        heads=config.num_heads,
    )


@pytest.mark.parametrize(("processes", "decoder_on_last_dit"), LAYOUTS)
def test_each_rank_plans_what_its_stage_holds(processes, decoder_on_last_dit):
    layout = RankLayout.for_world(processes, decoder_on_last_dit)
    plans = plan_roles(704, 384, layout=layout, **FULL_BF16)
    one_gpu = plan_roles(704, 384, **FULL_BF16)[Role.ONE_GPU]
    assert list(plans) == roles_of(layout)
    assert len(plans) == len({role_of_rank(layout, rank) for rank in range(layout.world_size)})
    for rank in range(layout.world_size):
        plan = plans[role_of_rank(layout, rank)]
        on_dit, decodes = rank < layout.dit_ranks, rank == layout.decoder_rank
        assert term(plan, TermKind.KV_CACHE).warmup == (own_rings_kv(layout) if on_dit else 0)
        whole_dit = term(one_gpu, TermKind.DIT_WEIGHTS).warmup
        assert term(plan, TermKind.DIT_WEIGHTS).warmup == (whole_dit if on_dit else 0)
        decoder_cache = term(one_gpu, TermKind.DECODER_CACHE).warmup
        assert term(plan, TermKind.DECODER_CACHE).warmup == (decoder_cache if decodes else 0)
        encoders = term(plan, TermKind.ENCODERS, TermKind.VAE_WEIGHTS)
        if rank == 0:  # the encoders, the VAE among them (it encodes the portrait)
            assert encoders.kind is TermKind.ENCODERS
            assert encoders.warmup == term(one_gpu, TermKind.ENCODERS).warmup
        elif decodes:
            assert (encoders.kind, encoders.warmup) == (TermKind.VAE_WEIGHTS, memory.vae_weight_bytes())
        else:
            assert encoders.warmup == 0
        activations = term(plan, TermKind.ACTIVATIONS)
        dit_block = memory.dit_activation_bytes(PRESETS["14b"], 2640, 3168)
        vae_block = memory.vae_decode_activation_bytes(704, 384)
        assert activations.warmup == on_dit * dit_block + decodes * vae_block and activations.transient
    # Split over ranks, no rank needs more than the one-GPU run.
    assert max(p.peak_bytes for p in plans.values()) < one_gpu.peak_bytes


@pytest.mark.parametrize("kv_format", KV_FORMATS)
def test_a_dit_rank_kv_is_its_rings_in_every_format(kv_format):
    layout = RankLayout.for_world(5)
    plans = plan_roles(704, 384, layout=layout, **(FULL_BF16 | {"kv_format": kv_format}))
    assert term(plans[Role.DIT], TermKind.KV_CACHE).warmup == own_rings_kv(layout, kv_format)


def test_each_kind_is_held_by_the_roles_whose_stage_holds_it():
    """The roles each term declares, for a layout with every role (4 processes: rank 3 decodes; 5: its own rank)."""
    denoise = {Role.LEAD, Role.DIT, Role.DECODING_DIT}
    expected = {
        TermKind.DIT_WEIGHTS: denoise,
        TermKind.ENCODERS: {Role.LEAD, Role.DECODING_DIT, Role.DECODER},  # the VAE alone where only decoding
        TermKind.KV_CACHE: denoise,
        TermKind.KV_DEQUANTIZATION_BUFFER: denoise,
        TermKind.ISPA_STATISTICS: denoise,
        TermKind.DELTA_W: denoise,
        TermKind.DECODER_CACHE: {Role.DECODING_DIT, Role.DECODER},
        TermKind.ACTIVATIONS: denoise | {Role.DECODER},
        TermKind.ABSORB_WORKSPACE: denoise,
    }
    for processes in (4, 5):
        layout = RankLayout.for_world(processes)
        present = set(roles_of(layout))
        plan = plan_terms(
            704, 384, layout=layout, **(FULL_BF16 | {"kv_format": "fp8", "policy": ISPAPolicy()})
        )
        assert {t.kind: set(t.roles) for t in plan.terms} == {k: v & present for k, v in expected.items()}
        # a share only for a role that holds the term, and what each role's plan holds is exactly that
        by_role = {role: plan.for_role(role) for role in present}
        for index, whole in enumerate(plan.terms):
            assert set(whole.shares) <= set(whole.roles)
            for role, role_plan in by_role.items():
                held = role_plan.terms[index]
                assert (held.warmup > 0 or held.after > 0) == (role in whole.roles), (whole.kind, role)
    one = plan_terms(704, 384, **(FULL_BF16 | {"policy": ISPAPolicy()}))
    assert {t.roles for t in one.terms} == {frozenset({Role.ONE_GPU})} and not any(
        t.shares for t in one.terms
    )


@pytest.mark.parametrize(("processes", "decoder_on_last_dit"), [(None, False), *LAYOUTS])
def test_rewording_every_label_changes_no_plan(processes, decoder_on_last_dit):
    layout = None if processes is None else RankLayout.for_world(processes, decoder_on_last_dit)
    settings = FULL_BF16 | {"kv_format": "fp8", "policy": ISPAPolicy()}
    plan = plan_terms(704, 384, layout=layout, **settings)

    def reworded(t: Term, tag: str) -> Term:
        shares = {role: reworded(share, f"{tag}{role.name}") for role, share in t.shares.items()}
        return replace(t, name=f"term {tag}", basis="reworded", shares=shares)

    relabelled = replace(plan, terms=tuple(reworded(t, str(i)) for i, t in enumerate(plan.terms)))
    assert not {t.name for t in plan.terms} & {t.name for t in relabelled.terms}
    for role, expected in plan_roles(704, 384, layout=layout, **settings).items():
        again = relabelled.for_role(role)
        assert [(t.kind, t.warmup, t.after, t.transient, t.per_model) for t in again.terms] == [
            (t.kind, t.warmup, t.after, t.transient, t.per_model) for t in expected.terms
        ]
        assert (again.peak_warmup_bytes, again.peak_after_bytes) == (
            expected.peak_warmup_bytes,
            expected.peak_after_bytes,
        )


def test_the_encoders_are_counted_in_the_dtypes_they_are_loaded_in():
    bf16_everything = 2 * (memory.WAN21_VAE_PARAMS + memory.WAV2VEC2_LARGE_PARAMS)
    # wav2vec2 in bf16 as the official pipeline runs it (the loader's default), or fp32 on request
    assert memory.encoder_bytes(text_encoder_on_gpu=False) == bf16_everything
    assert (
        memory.encoder_bytes(text_encoder_on_gpu=False, audio_fp32=True)
        == bf16_everything + 2 * memory.WAV2VEC2_LARGE_PARAMS
    )


@pytest.mark.parametrize(("processes", "decoder_on_last_dit"), LAYOUTS)
def test_a_rank_loads_only_its_stage_models(processes, decoder_on_last_dit):
    layout = RankLayout.for_world(processes, decoder_on_last_dit)
    plans = plan_roles(704, 384, layout=layout, **FULL_BF16)
    for rank in range(1, layout.world_size):
        models = load_stage_models("tiny", layout, rank, fp8=False)
        plan = plans[role_of_rank(layout, rank)]
        holds_dit = term(plan, TermKind.DIT_WEIGHTS).warmup > 0
        assert (models.dit is not None) == (rank < layout.dit_ranks) == holds_dit
        holds_vae = term(plan, TermKind.ENCODERS, TermKind.VAE_WEIGHTS).warmup > 0
        assert (models.vae is not None) == (rank == layout.decoder_rank) == holds_vae
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
    dit_rank = lightest_plan(weights="fp8", layout=layout, rank=1)
    decoder_rank = lightest_plan(weights="fp8", layout=layout, rank=4)
    assert decoder_rank.peak_bytes < 3 * GIB < dit_rank.peak_bytes
    assert dit_rank.settings["kv_format"] == LIGHTEST_KV_FORMAT and dit_rank.settings["size"] == "512x320"
    free["bytes"] = 6 * GIB
    with pytest.raises(InsufficientGPUMemoryError, match=r"Fake GPU \(DiT rank\).*only 6.00 GiB is free"):
        load_stage_models("14b", layout, 1, fp8=True)
    # The decoder rank needs no room for a DiT: it passes the check and only then finds no weights here.
    with pytest.raises(RuntimeError, match="LiveAvatar 14B cannot run here: weights not found"):
        load_stage_models("14b", layout, 4, fp8=True)


def test_a_rank_outside_the_layout_has_no_role():
    layout = RankLayout.for_world(3)
    assert [role_of_rank(layout, rank) for rank in range(3)] == [Role.LEAD, Role.DIT, Role.DECODER]
    assert role_of_rank(None) is Role.ONE_GPU
    with pytest.raises(ValueError, match="rank 3"):
        role_of_rank(layout, 3)
