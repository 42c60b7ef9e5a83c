"""The 14B size chooser offers only the sizes whose lightest run fits the detected GPU, and says why others not;
a run whose own settings do not fit is refused with the formats that would. On a pipeline of ranks the heaviest
rank is planned."""

from __future__ import annotations

import numpy as np
import pytest

from app.gpu_sizes import check_run_fits, gpu_planner, sizes_for_gpu
from app.inputs import COMPARE, ISPA, RunSpec
from app.validation import Settings, ValidationError
from avatars.liveavatar.distributed import RankLayout
from avatars.liveavatar.distributed.rank_memory import plan_ranks
from avatars.liveavatar.loading import build_tiny_pipeline
from avatars.liveavatar.memory_plan import CUDA_CONTEXT_BYTES, GIB, compare_peak_bytes, plan_run
from avatars.liveavatar.sizing import LIVEAVATAR_SIZES, PLANNED_ASPECT, choose_size
from tests.app.conftest import unjoined_lead

SIZES = [(s.label, s.max_area) for s in LIVEAVATAR_SIZES]
DIVISOR = 64


def planned_peak(area: int, weights: str) -> int:
    height, width = choose_size(*PLANNED_ASPECT, area, DIVISOR)
    return plan_run(height, width, weights=weights, kv_format="int4", policy="full").peak_bytes


def test_without_a_gpu_every_size_is_offered() -> None:
    assert sizes_for_gpu(SIZES, DIVISOR, fp8_weights=True, gpu_bytes=lambda: None) == (SIZES, [])


@pytest.mark.parametrize("gpu_gib", [24, 48, 80, 139])
@pytest.mark.parametrize("fp8", [True, False])
def test_a_size_is_offered_exactly_when_its_plan_fits(gpu_gib: int, fp8: bool) -> None:
    kept, reasons = sizes_for_gpu(SIZES, DIVISOR, fp8_weights=fp8, gpu_bytes=lambda: gpu_gib * GIB)
    weights = "fp8" if fp8 else "bf16"
    expected = [
        (label, area)
        for label, area in SIZES
        if planned_peak(area, weights) + CUDA_CONTEXT_BYTES <= gpu_gib * GIB
    ]
    assert kept == expected
    left_out = [label for label, _ in SIZES if (label, dict(SIZES)[label]) not in expected]
    assert len(reasons) == len(left_out)
    for label, reason in zip(left_out, reasons, strict=True):
        assert reason.startswith(f"{label}: peak") and "does not fit" in reason and weights in reason


def test_the_official_size_is_planned_at_704x384() -> None:
    assert choose_size(*PLANNED_ASPECT, SIZES[0][1], DIVISOR) == (704, 384)


def test_the_app_offers_only_the_usable_sizes_and_refuses_when_none_fits(monkeypatch) -> None:
    from app import main
    from app.inputs import EngineChoices

    monkeypatch.setattr(
        main, "usable_sizes", lambda name, pipe: ([("64×64 area", 4096)], ["128×64 area: peak …"])
    )
    dropdown = main.refresh_sizes("tiny")
    assert [choice[0] for choice in dropdown.choices] == ["default", "64×64 area"]
    assert "Left out, by the memory plan: 128×64 area" in dropdown.info

    monkeypatch.setattr(
        main, "usable_sizes", lambda name, pipe: ([], ["720×400 area (official): peak 70 GiB"])
    )
    choices = EngineChoices(
        policy="ISPA", k_fraction=0.5, t_warm=6, lam=1e-3, seed=0, size="default", model="tiny"
    )
    with pytest.raises(main.ValidationError, match="No size of this model fits this GPU: 720×400 area"):
        main._prepare(choices, portrait=None, prompt="", audio=None, text=None, live=False)


def run_spec(mode: str, kv_format: str) -> RunSpec:
    return RunSpec(
        portrait=np.zeros((160, 90, 3), dtype=np.uint8),  # 16:9: 704×384 under the official area
        audio=None,
        audio_source="live",
        speech_seconds=None,
        prompt="",
        mode=mode,
        settings=Settings(k_fraction=0.5, t_warm=12, lam=1e-3, seed=0),
        size_label=SIZES[0][0],
        max_area=SIZES[0][1],
        kv_format=kv_format,
    )


def test_a_run_is_refused_exactly_when_its_own_plan_does_not_fit() -> None:
    pipe = build_tiny_pipeline()  # only its size arithmetic is used: 14B is planned at the portrait's size

    def peak(kv: str, policy: str) -> int:
        return plan_run(704, 384, weights="fp8", kv_format=kv, policy=policy).peak_bytes

    gpu = peak("fp8", "ispa") + CUDA_CONTEXT_BYTES  # ISPA with fp8 KV just fits
    check_run_fits(run_spec(ISPA, "fp8"), pipe, fp8_weights=True, gpu_bytes=lambda: gpu)
    assert peak("bf16", "ispa") + CUDA_CONTEXT_BYTES > gpu
    with pytest.raises(ValidationError) as err:
        check_run_fits(run_spec(ISPA, "bf16"), pipe, fp8_weights=True, gpu_bytes=lambda: gpu)
    fitting = [
        kv for kv in ("bf16", "fp8", "fp8-all", "int4") if peak(kv, "ispa") + CUDA_CONTEXT_BYTES <= gpu
    ]
    message = str(err.value)
    assert "ISPA at 704×384 with bf16 KV" in message and f"{peak('bf16', 'ispa') / GIB:.2f} GiB" in message
    assert message.endswith(f"it fits with the KV-cache format {' or '.join(fitting)}.")
    check_run_fits(run_spec(ISPA, "bf16"), pipe, fp8_weights=True, gpu_bytes=lambda: None)  # no GPU: no plan


def test_compare_mode_counts_both_runs_caches_once_beside_one_model() -> None:
    full = plan_run(704, 384, weights="fp8", kv_format="fp8", policy="full")
    ispa = plan_run(704, 384, weights="fp8", kv_format="fp8", policy="ispa")
    by_name = {t.name: t for t in full.terms}
    shared = by_name["DiT weights"].warmup + sum(
        t.warmup for n, t in by_name.items() if n.startswith("encoders")
    )
    both = compare_peak_bytes(full, ispa)
    assert max(full.peak_bytes, ispa.peak_bytes) < both < full.peak_bytes + ispa.peak_bytes - shared
    pipe = build_tiny_pipeline()
    check_run_fits(
        run_spec(COMPARE, "fp8"), pipe, fp8_weights=True, gpu_bytes=lambda: both + CUDA_CONTEXT_BYTES
    )
    with pytest.raises(ValidationError, match="Compare at 704×384"):
        gpu = both + CUDA_CONTEXT_BYTES - 1
        check_run_fits(run_spec(COMPARE, "fp8"), pipe, fp8_weights=True, gpu_bytes=lambda: gpu)


def test_on_a_pipeline_of_ranks_the_heaviest_rank_is_planned() -> None:
    lead, alone = unjoined_lead(5), build_tiny_pipeline()
    layout = RankLayout.for_world(5)

    def heaviest_rank(**settings) -> int:
        return max(plan.peak_bytes for plan in plan_ranks(704, 384, layout, **settings).values())

    # bf16 weights, ISPA, fp8 KV: one GPU needs more than any rank of five.
    run = {"weights": "bf16", "kv_format": "fp8", "policy": "ispa"}
    gpu = heaviest_rank(**run) + CUDA_CONTEXT_BYTES
    assert plan_run(704, 384, **run).peak_bytes + CUDA_CONTEXT_BYTES > gpu
    check_run_fits(run_spec(ISPA, "fp8"), lead, fp8_weights=False, gpu_bytes=lambda: gpu)
    with pytest.raises(ValidationError, match="This run does not fit the GPU: ISPA"):
        check_run_fits(run_spec(ISPA, "fp8"), alone, fp8_weights=False, gpu_bytes=lambda: gpu)
    with pytest.raises(ValidationError, match="fit the GPUs of the pipeline: ISPA .* on its heaviest rank"):
        check_run_fits(run_spec(ISPA, "fp8"), lead, fp8_weights=False, gpu_bytes=lambda: gpu - 1)
    # The size chooser: the official size is offered on the ranks' GPUs, not on one such GPU.
    lightest = {"weights": "bf16", "kv_format": "int4", "policy": "full"}
    gpu = heaviest_rank(**lightest) + CUDA_CONTEXT_BYTES
    assert planned_peak(SIZES[0][1], "bf16") + CUDA_CONTEXT_BYTES > gpu
    on_ranks, _ = sizes_for_gpu(
        SIZES, DIVISOR, fp8_weights=False, planner=gpu_planner(lead), gpu_bytes=lambda: gpu
    )
    on_one, _ = sizes_for_gpu(
        SIZES, DIVISOR, fp8_weights=False, planner=gpu_planner(alone), gpu_bytes=lambda: gpu
    )
    assert SIZES[0] in on_ranks and SIZES[0] not in on_one
