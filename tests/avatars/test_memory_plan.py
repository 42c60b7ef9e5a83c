"""`python -m avatars.liveavatar.memory_plan`: its terms against live tensors of tiny DiT runs, its peaks and fits
against its own terms, the 14B figures against hand arithmetic, and the size chooser's verdicts."""

from __future__ import annotations

import json

import pytest
import torch

from avatars.liveavatar import memory_plan
from avatars.liveavatar.config import PRESETS
from avatars.liveavatar.dit import LiveAvatarDiT
from avatars.liveavatar.weights import memory
from ispa import KV_FORMATS, FullPolicy, ISPAPolicy
from tests.fixtures.tiny_dit_run import run_blocks

GIB = 2**30


def terms(plan) -> dict[str, memory_plan.Term]:
    return {t.name.split(" (")[0]: t for t in plan.terms}


@pytest.mark.parametrize("kv_format", KV_FORMATS)
def test_ispa_terms_equal_the_live_tensors_of_a_tiny_run(kv_format):
    # t_warm 12 = 4 blocks: blocks 0-2 fill the rings (3 slots), block 3 absorbs
    plan = memory_plan.plan_run(
        64, 64, weights="bf16", kv_format=kv_format, policy="ispa", t_warm=12, k_fraction=0.5, model="tiny"
    )
    by_name = terms(plan)
    policy = ISPAPolicy(k_fraction=0.5, t_warm=12)
    model, session, reports, factory = run_blocks(PRESETS["tiny"], (8, 8), policy, 5, kv_format)
    assert [r.event for r in reports] == [None, None, None, "absorbed", None]
    warm_kv, after_kv = by_name["KV cache"].warmup, by_name["KV cache"].after
    assert reports[2].kv_bytes == warm_kv  # the most KV warmup holds: whole rings, just before the absorb
    assert reports[3].kv_bytes == reports[4].kv_bytes == after_kv == session.cache.nbytes()
    # a report counts the statistics held during its block: block 3 absorbs, block 4 holds none
    assert reports[3].stats_bytes == by_name["ISPA statistics"].warmup > 0
    assert reports[4].stats_bytes == by_name["ISPA statistics"].after == 0
    assert reports[3].delta_weight_bytes == by_name["L-layers' projections with ΔW"].after > 0
    buffer = factory.buffer_nbytes() if kv_format != "bf16" else 0
    assert buffer == by_name["KV dequantization buffer"].warmup == by_name["KV dequantization buffer"].after
    live_weights = sum(t.nbytes for t in model.state_dict().values())
    assert live_weights == by_name["DiT weights"].warmup


def test_fp8_weights_keep_their_l_layers_delta_in_bf16_as_planned():
    plan = memory_plan.plan_run(64, 64, weights="fp8", kv_format="fp8", policy="ispa", t_warm=6, model="tiny")
    _, _, reports, _ = run_blocks(
        PRESETS["tiny"], (8, 8), ISPAPolicy(k_fraction=0.5, t_warm=6), 2, "fp8", fp8=True
    )
    assert reports[1].event == "absorbed"
    assert reports[1].delta_weight_bytes == terms(plan)["L-layers' projections with ΔW"].after > 0


def test_a_short_warmup_holds_less_at_the_absorb_and_full_holds_whole_rings():
    def kv(policy: str, t_warm: int = 12) -> memory_plan.Term:
        plan = memory_plan.plan_run(
            64, 64, weights="bf16", kv_format="bf16", policy=policy, t_warm=t_warm, model="tiny"
        )
        return terms(plan)["KV cache"]

    # warmup attends exactly like Full, so a Full run's blocks show what warmup holds before its absorb
    _, _, full_reports, _ = run_blocks(PRESETS["tiny"], (8, 8), FullPolicy(), 3)
    assert kv("ispa", t_warm=6).warmup == full_reports[1].kv_bytes  # 2 blocks: 2 slots per ring
    assert kv("ispa", t_warm=12).warmup == full_reports[2].kv_bytes > full_reports[1].kv_bytes  # whole rings
    assert kv("full").warmup == kv("full").after == full_reports[2].kv_bytes
    full = terms(memory_plan.plan_run(64, 64, weights="bf16", policy="full", model="tiny"))
    assert full["ISPA statistics"].warmup == full["absorb solve workspace"].warmup == 0


def test_peaks_are_the_held_terms_plus_the_largest_transient():
    plan = memory_plan.plan_run(704, 384, weights="fp8", kv_format="fp8", policy="ispa")
    held = sum(t.warmup for t in plan.terms if not t.transient)
    transient = max(t.warmup for t in plan.terms if t.transient)
    assert plan.peak_warmup_bytes == held + transient
    assert plan.peak_after_bytes == sum(t.after for t in plan.terms if not t.transient) + max(
        t.after for t in plan.terms if t.transient
    )
    by_name = terms(plan)
    with torch.device("meta"):
        meta_dit = LiveAvatarDiT.from_config(PRESETS["14b"])
    assert by_name["DiT weights"].warmup == memory.dit_weight_bytes(meta_dit, fp8=True)
    # 14B at 704x384: 40 layers x (2640 bf16 sink tokens + 4 rings x 3 blocks x 3168 tokens x 10,560 B fp8 history)
    sink = 2 * 2640 * 5120 * 2
    assert by_name["KV cache"].warmup == 40 * (sink + 12 * 3168 * 10560)
    assert by_name["KV cache"].after == 20 * sink + 20 * (sink + 12 * 3168 * 10560)
    # ΔW is applied as its own bf16 product next to the FP8 projection (ispa/projection.py)
    assert by_name["L-layers' projections with ΔW"].after == 20 * 5120 * 5120 * 2
    assert by_name["KV dequantization buffer"].warmup == 2 * 3 * 3168 * 5120 * 2


def test_fits_leave_one_and_a_half_gib_for_the_cuda_context():
    plan = memory_plan.plan_run(704, 384, weights="fp8", kv_format="fp8", policy="ispa")
    capacity = plan.peak_bytes + int(1.5 * GIB)
    assert memory_plan.fits_capacity(plan.peak_bytes, capacity)
    assert not memory_plan.fits_capacity(plan.peak_bytes, capacity - 1)
    expected = [
        gb
        for gb, cap in ((24, 24), (48, 48), (80, 80), (141, 139))
        if plan.peak_bytes + 1.5 * GIB <= cap * GIB
    ]
    assert plan.fits() == expected


def test_the_command_prints_every_term_and_ends_with_the_contract_json(capsys):
    argv = ["--size", "704x384", "--weights", "fp8", "--kv", "fp8", "--policy", "ispa", "--json"]
    assert memory_plan.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    plan = memory_plan.plan_run(704, 384, weights="fp8", kv_format="fp8", policy="ispa")
    assert result["peak_warmup_bytes"] == plan.peak_warmup_bytes
    assert result["peak_after_bytes"] == plan.peak_after_bytes
    assert result["fits"] == plan.fits() and set(result["fits"]) <= {24, 48, 80, 141}
    for term in plan.terms:
        assert any(line.startswith(term.name) for line in lines), term.name
        assert result["terms"][term.name] == {"warmup": term.warmup, "after": term.after, "basis": term.basis}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"weights": "int8"}, "weights"),
        ({"kv_format": "int2"}, "kv_format"),
        ({"policy": "fast"}, "policy"),
        ({"t_warm": 3}, "t_warm"),
        ({"model": "7b"}, "model"),
    ],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        memory_plan.plan_run(704, 384, **kwargs)


def test_a_bad_size_exits_with_status_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        memory_plan.main(["--size", "big"])
    assert exit_info.value.code == 2 and "--size" in capsys.readouterr().err
    assert memory_plan.main(["--size", "700x384"]) == 2  # not a multiple of 64


def test_the_size_chooser_says_which_sizes_fit_and_why():
    sizes = [("704×384 (official)", 704, 384), ("512×320 (faster)", 512, 320)]
    fp8 = memory_plan.sizes_that_fit(48 * GIB, sizes, weights="fp8", kv_format="fp8", policy="ispa")
    bf16 = memory_plan.sizes_that_fit(48 * GIB, sizes, weights="fp8", kv_format="bf16", policy="ispa")
    assert [s.fits for s in fp8] == [True, True]
    assert bf16[0].fits is False and "does not fit" in bf16[0].reason and "bf16 KV" in bf16[0].reason
    assert fp8[1].peak_bytes < fp8[0].peak_bytes
    assert f"{fp8[0].peak_bytes / GIB:.2f} GiB" in fp8[0].reason
    with pytest.raises(ValueError, match="gpu_bytes"):
        memory_plan.sizes_that_fit(0, sizes)
