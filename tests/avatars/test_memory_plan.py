"""`python -m avatars.liveavatar.memory_plan`: its terms against live tensors of tiny DiT runs, its peaks and fits
against its own terms, the 14B figures against hand arithmetic, and its settings' checks."""

from __future__ import annotations

import json

import pytest
import torch

from avatars.liveavatar.config import PRESETS
from avatars.liveavatar.dit import LiveAvatarDiT
from avatars.liveavatar.memory_plan import Role, plan_roles
from avatars.liveavatar.memory_plan import terms as memory
from avatars.liveavatar.memory_plan.cli import main
from avatars.memory import GIB, GPU_CARDS, MemoryPlan, Term, TermKind, fits_capacity
from ispa import KV_FORMATS, FullPolicy, ISPAPolicy, make_policy
from tests.fixtures.tiny_dit_run import run_blocks


def one_gpu(
    height: int, width: int, *, model: str = "14b", weights: str = "fp8", kv_format: str = "fp8", policy=None
):
    """The plan of a run on one GPU (ISPA with the paper's settings unless told)."""
    policy = ISPAPolicy() if policy is None else policy
    plans = plan_roles(height, width, model=model, weights=weights, kv_format=kv_format, policy=policy)
    assert list(plans) == [Role.ONE_GPU]
    return plans[Role.ONE_GPU]


def terms(plan: MemoryPlan) -> dict[TermKind, Term]:
    by_kind = {t.kind: t for t in plan.terms}
    assert len(by_kind) == len(plan.terms)  # one term of each kind
    return by_kind


@pytest.mark.parametrize("kv_format", KV_FORMATS)
def test_ispa_terms_equal_the_live_tensors_of_a_tiny_run(kv_format):
    # t_warm 12 = 4 blocks: blocks 0-2 fill the rings (3 slots), block 3 absorbs
    policy = ISPAPolicy(k_fraction=0.5, t_warm=12)
    by_name = terms(one_gpu(64, 64, model="tiny", weights="bf16", kv_format=kv_format, policy=policy))
    model, session, reports, factory = run_blocks(PRESETS["tiny"], (8, 8), policy, 5, kv_format)
    assert [r.event for r in reports] == [None, None, None, "absorbed", None]
    warm_kv, after_kv = by_name[TermKind.KV_CACHE].warmup, by_name[TermKind.KV_CACHE].after
    assert reports[2].kv_bytes == warm_kv  # the most KV warmup holds: whole rings, just before the absorb
    assert reports[3].kv_bytes == reports[4].kv_bytes == after_kv == session.cache.nbytes()
    # a report counts the statistics held during its block: block 3 absorbs, block 4 holds none
    assert reports[3].stats_bytes == by_name[TermKind.ISPA_STATISTICS].warmup > 0
    assert reports[4].stats_bytes == by_name[TermKind.ISPA_STATISTICS].after == 0
    assert reports[3].delta_weight_bytes == by_name[TermKind.DELTA_W].after > 0
    buffer = factory.buffer_nbytes() if kv_format != "bf16" else 0
    assert (
        buffer
        == by_name[TermKind.KV_DEQUANTIZATION_BUFFER].warmup
        == by_name[TermKind.KV_DEQUANTIZATION_BUFFER].after
    )
    live_weights = sum(t.nbytes for t in model.state_dict().values())
    assert live_weights == by_name[TermKind.DIT_WEIGHTS].warmup


def test_fp8_weights_keep_their_l_layers_delta_in_bf16_as_planned():
    plan = one_gpu(64, 64, model="tiny", policy=ISPAPolicy(k_fraction=0.5, t_warm=6))
    _, _, reports, _ = run_blocks(
        PRESETS["tiny"], (8, 8), ISPAPolicy(k_fraction=0.5, t_warm=6), 2, "fp8", fp8=True
    )
    assert reports[1].event == "absorbed"
    assert reports[1].delta_weight_bytes == terms(plan)[TermKind.DELTA_W].after > 0


def test_a_short_warmup_holds_less_at_the_absorb_and_full_holds_whole_rings():
    def kv(policy: str, t_warm: int = 12) -> Term:
        engine = FullPolicy() if policy == "full" else ISPAPolicy(t_warm=t_warm)
        plan = one_gpu(64, 64, model="tiny", weights="bf16", kv_format="bf16", policy=engine)
        return terms(plan)[TermKind.KV_CACHE]

    # warmup attends exactly like Full, so a Full run's blocks show what warmup holds before its absorb
    _, _, full_reports, _ = run_blocks(PRESETS["tiny"], (8, 8), FullPolicy(), 3)
    assert kv("ispa", t_warm=6).warmup == full_reports[1].kv_bytes  # 2 blocks: 2 slots per ring
    assert kv("ispa", t_warm=12).warmup == full_reports[2].kv_bytes > full_reports[1].kv_bytes  # whole rings
    assert kv("full").warmup == kv("full").after == full_reports[2].kv_bytes
    full = terms(one_gpu(64, 64, model="tiny", weights="bf16", policy=FullPolicy()))
    assert full[TermKind.ISPA_STATISTICS].warmup == full[TermKind.ABSORB_WORKSPACE].warmup == 0


def test_peaks_are_the_held_terms_plus_the_largest_transient():
    plan = one_gpu(704, 384)
    held = sum(t.warmup for t in plan.terms if not t.transient)
    transient = max(t.warmup for t in plan.terms if t.transient)
    assert plan.peak_warmup_bytes == held + transient
    assert plan.peak_after_bytes == sum(t.after for t in plan.terms if not t.transient) + max(
        t.after for t in plan.terms if t.transient
    )
    by_name = terms(plan)
    with torch.device("meta"):
        meta_dit = LiveAvatarDiT.from_config(PRESETS["14b"])
    assert by_name[TermKind.DIT_WEIGHTS].warmup == memory.dit_weight_bytes(meta_dit, fp8=True)
    # 14B at 704x384: 40 layers x (2640 bf16 sink tokens + 4 rings x 3 blocks x 3168 tokens x 10,560 B fp8 history)
    sink = 2 * 2640 * 5120 * 2
    assert by_name[TermKind.KV_CACHE].warmup == 40 * (sink + 12 * 3168 * 10560)
    assert by_name[TermKind.KV_CACHE].after == 20 * sink + 20 * (sink + 12 * 3168 * 10560)
    # ΔW is applied as its own bf16 product next to the FP8 projection (ispa/projection.py)
    assert by_name[TermKind.DELTA_W].after == 20 * 5120 * 5120 * 2
    assert by_name[TermKind.KV_DEQUANTIZATION_BUFFER].warmup == 2 * 3 * 3168 * 5120 * 2


def test_fits_leave_one_and_a_half_gib_for_the_cuda_context():
    plan = one_gpu(704, 384)
    capacity = plan.peak_bytes + int(1.5 * GIB)
    assert fits_capacity(plan.peak_bytes, capacity)
    assert not fits_capacity(plan.peak_bytes, capacity - 1)
    expected = [card.name for card in GPU_CARDS if plan.peak_bytes + 1.5 * GIB <= card.capacity_bytes]
    assert plan.fits() == expected


def test_the_command_prints_every_term_and_ends_with_the_contract_json(capsys):
    argv = ["--size", "704x384", "--weights", "fp8", "--kv", "fp8", "--policy", "ispa", "--json"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert list(result) == ["settings", "terms", "peak_warmup_bytes", "peak_after_bytes", "fits"]
    plan = one_gpu(704, 384)
    assert result["peak_warmup_bytes"] == plan.peak_warmup_bytes
    assert result["peak_after_bytes"] == plan.peak_after_bytes
    assert result["fits"] == plan.fits() and set(result["fits"]) <= {card.name for card in GPU_CARDS}
    # issue 20: FP8 weights, fp8 KV and ISPA at 704×384 fit an L40S (45.0 GiB reported) with the CUDA context
    assert result["peak_warmup_bytes"] <= 43.5 * GIB and "L40S 48 GB" in result["fits"]
    for term in plan.terms:
        assert any(line.startswith(term.name) for line in lines), term.name
        assert result["terms"][term.name] == {"warmup": term.warmup, "after": term.after, "basis": term.basis}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"weights": "int8"}, "weights"),
        ({"kv_format": "int2"}, "kv_format"),
        ({"policy": "ispa"}, "policy"),  # the engine's Policy object, not its name
        ({"policy": ISPAPolicy(t_warm=3)}, "t_warm"),
        ({"model": "7b"}, "model"),
    ],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        one_gpu(704, 384, **kwargs)


def test_a_bad_size_exits_with_status_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--size", "big"])
    assert exit_info.value.code == 2 and "--size" in capsys.readouterr().err
    assert main(["--size", "700x384"]) == 2  # not a multiple of 64


def test_the_command_prints_each_role_of_a_pipeline_of_ranks(capsys):
    from avatars.liveavatar.rank_layout import RankLayout

    assert main(["--ranks", "4", "--policy", "full", "--kv", "int4", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    layout = RankLayout.for_world(4)
    plans = plan_roles(
        704, 384, model="14b", weights="fp8", kv_format="int4", policy=FullPolicy(), layout=layout
    )
    assert (result["processes"], result["dit_ranks"], result["decoder_rank"]) == (4, 4, 3)
    assert (
        list(result["roles"])
        == [role.value for role in plans]
        == [
            "rank 0 (DiT rank 0, the encoders)",
            "DiT rank",
            "last DiT rank (decodes too)",
        ]
    )
    for role, plan in plans.items():
        assert any(line.startswith(role.value) for line in lines)
        printed = result["roles"][role.value]
        assert (printed["peak_warmup_bytes"], printed["peak_after_bytes"]) == (
            plan.peak_warmup_bytes,
            plan.peak_after_bytes,
        )
    assert main(["--decoder-on-last-dit"]) == 2  # only with --ranks
    assert main(["--ranks", "3", "--decoder-on-last-dit"]) == 2  # no such layout
    assert "error: cannot lay out the pipeline on 3 processes" in capsys.readouterr().out


@pytest.mark.parametrize(("name", "kv_format"), [("evict", "bf16"), ("window", "int4"), ("salience", "bf16")])
def test_comparison_policies_terms_equal_the_live_tensors_and_ispas_bytes(name, kv_format):
    # t_warm 9 = 3 blocks: the rings are full at the transition, so the plan's "after" is held from then on
    policy = make_policy(name, k_fraction=0.5, t_warm=9)
    by_name = terms(one_gpu(64, 64, model="tiny", weights="bf16", kv_format=kv_format, policy=policy))
    ispa = terms(
        one_gpu(64, 64, model="tiny", weights="bf16", kv_format=kv_format, policy=ISPAPolicy(t_warm=9))
    )
    _, _, reports, _ = run_blocks(PRESETS["tiny"], (8, 8), policy, 4, kv_format)
    assert reports[2].event == "evicted"
    kv = by_name[TermKind.KV_CACHE]
    assert reports[2].kv_bytes == reports[3].kv_bytes == kv.after
    assert abs(kv.after - ispa[TermKind.KV_CACHE].after) <= 0.1 * ispa[TermKind.KV_CACHE].after
    assert reports[3].delta_weight_bytes == by_name[TermKind.DELTA_W].after == 0
    statistics = by_name[TermKind.ISPA_STATISTICS].warmup
    assert (statistics > 0) == (name == "evict") and reports[1].stats_bytes == statistics
