"""The 14B size chooser offers only the sizes whose memory plan fits the detected GPU, and says why others not."""

from __future__ import annotations

import pytest

from app.gpu_sizes import PLANNED_ASPECT, sizes_for_gpu
from avatars.liveavatar.memory_plan import CUDA_CONTEXT_BYTES, GIB, plan_run
from avatars.liveavatar.sizing import LIVEAVATAR_SIZES, choose_size

SIZES = [(s.label, s.max_area) for s in LIVEAVATAR_SIZES]
DIVISOR = 64


def planned_peak(area: int, weights: str) -> int:
    height, width = choose_size(*PLANNED_ASPECT, area, DIVISOR)
    return plan_run(height, width, weights=weights, kv_format="bf16", policy="ispa").peak_bytes


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
