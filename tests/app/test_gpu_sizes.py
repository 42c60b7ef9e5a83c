"""The size chooser offers only the sizes whose lightest run fits the detected GPU, and says why others not;
a run whose own settings do not fit is refused with the formats that would. A backend over several GPUs has its
heaviest GPU planned. The backend here is a fake that answers with LiveAvatar 14B's real plans (nothing loaded):
the app reads a backend only through `AvatarBackend`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.gpu_sizes import check_run_fits, sizes_for_gpu
from app.inputs import COMPARE, ISPA, RunSpec
from app.validation import Settings, ValidationError
from avatars.liveavatar.memory_plan import Role, plan_roles
from avatars.liveavatar.rank_layout import RankLayout
from avatars.liveavatar.sizing import LIVEAVATAR_SIZES, PLANNED_ASPECT, choose_size, planned_size
from avatars.memory import CUDA_CONTEXT_BYTES, GIB, MemoryPlan, Term, TermKind, compare_peak_bytes
from ispa import KV_FORMATS, LIGHTEST_KV_FORMAT, FullPolicy, ISPAPolicy, Policy

SIZES = [(s.label, s.max_area) for s in LIVEAVATAR_SIZES]
DIVISOR = 64


class PlannedBackend:
    """The memory side of a LiveAvatar 14B backend (sizes, output size, memory plans), on one GPU or on the ranks
    of `layout`, with the real planner and no model."""

    device = torch.device("cuda", 0)  # never used as a device: the tests hand in what the GPU reports

    def __init__(self, weights: str = "fp8", layout: RankLayout | None = None) -> None:
        self.weights, self.layout = weights, layout

    def size_choices(self) -> list[tuple[str, int]]:
        return list(SIZES)

    def planned_size(self, max_area: int) -> tuple[int, int]:
        return planned_size(max_area, DIVISOR)

    def output_size(self, portrait: np.ndarray, max_area: int | None = None) -> tuple[int, int]:
        area = SIZES[0][1] if max_area is None else max_area
        return choose_size(portrait.shape[0], portrait.shape[1], area, DIVISOR)

    def memory_plans(self, height: int, width: int, policy: Policy, kv_format: str) -> list[MemoryPlan]:
        plans = plan_roles(
            height,
            width,
            model="14b",
            weights=self.weights,
            kv_format=kv_format,
            policy=policy,
            layout=self.layout,
        )
        return list(plans.values())


def one_gpu(weights: str, kv_format: str, policy: Policy, height: int = 704, width: int = 384) -> MemoryPlan:
    plans = plan_roles(height, width, model="14b", weights=weights, kv_format=kv_format, policy=policy)
    return plans[Role.ONE_GPU]


def planned_peak(area: int, weights: str) -> int:
    height, width = choose_size(*PLANNED_ASPECT, area, DIVISOR)
    return one_gpu(weights, LIGHTEST_KV_FORMAT, FullPolicy(), height, width).peak_bytes


def test_without_a_gpu_every_size_is_offered() -> None:
    assert sizes_for_gpu(PlannedBackend(), gpu_bytes=lambda device: None) == (SIZES, [])
    cpu_backend = PlannedBackend()
    cpu_backend.device = torch.device("cpu")
    assert sizes_for_gpu(cpu_backend) == (SIZES, [])  # a backend off the GPUs is not planned for


@pytest.mark.parametrize("gpu_gib", [24, 48, 80, 139])
@pytest.mark.parametrize("fp8", [True, False])
def test_a_size_is_offered_exactly_when_its_plan_fits(gpu_gib: int, fp8: bool) -> None:
    weights = "fp8" if fp8 else "bf16"
    kept, reasons = sizes_for_gpu(PlannedBackend(weights), gpu_bytes=lambda device: gpu_gib * GIB)
    expected = [
        (label, area)
        for label, area in SIZES
        if planned_peak(area, weights) + CUDA_CONTEXT_BYTES <= gpu_gib * GIB
    ]
    assert kept == expected
    left_out = [label for label, _ in SIZES if (label, dict(SIZES)[label]) not in expected]
    assert len(reasons) == len(left_out)
    for label, reason in zip(left_out, reasons, strict=True):
        peak = planned_peak(dict(SIZES)[label], weights)
        assert reason.startswith(f"{label}: peak {peak / GIB:.2f} GiB") and "does not fit" in reason
        assert reason.endswith(f"({weights} weights, {LIGHTEST_KV_FORMAT} KV, full)")


def test_the_official_size_is_planned_at_704x384() -> None:
    assert choose_size(*PLANNED_ASPECT, SIZES[0][1], DIVISOR) == (704, 384)


def test_the_app_offers_only_the_usable_sizes_and_refuses_when_none_fits(monkeypatch) -> None:
    from app import main
    from app.inputs import EngineChoices

    monkeypatch.setattr(main, "usable_sizes", lambda pipe: ([("64×64 area", 4096)], ["128×64 area: peak …"]))
    dropdown = main.refresh_sizes("tiny")
    assert [choice[0] for choice in dropdown.choices] == ["default", "64×64 area"]
    assert "Left out, by the memory plan: 128×64 area" in dropdown.info

    monkeypatch.setattr(main, "usable_sizes", lambda pipe: ([], ["720×400 area (official): peak 70 GiB"]))
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
    backend = PlannedBackend("fp8")  # the run is planned at the portrait's size: 704×384

    def peak(kv: str) -> int:
        return one_gpu("fp8", kv, ISPAPolicy(k_fraction=0.5, t_warm=12)).peak_bytes

    gpu = peak("fp8") + CUDA_CONTEXT_BYTES  # ISPA with fp8 KV just fits
    check_run_fits(run_spec(ISPA, "fp8"), backend, gpu_bytes=lambda device: gpu)
    assert peak("bf16") + CUDA_CONTEXT_BYTES > gpu
    with pytest.raises(ValidationError) as err:
        check_run_fits(run_spec(ISPA, "bf16"), backend, gpu_bytes=lambda device: gpu)
    fitting = [kv for kv in KV_FORMATS if peak(kv) + CUDA_CONTEXT_BYTES <= gpu]
    message = str(err.value)
    assert "ISPA at 704×384 with bf16 KV" in message and f"{peak('bf16') / GIB:.2f} GiB" in message
    assert message.endswith(f"it fits with the KV-cache format {' or '.join(fitting)}.")
    check_run_fits(run_spec(ISPA, "bf16"), backend, gpu_bytes=lambda device: None)  # no GPU: no plan


def test_compare_mode_counts_both_runs_caches_once_beside_one_model() -> None:
    full = one_gpu("fp8", "fp8", FullPolicy())
    ispa = one_gpu("fp8", "fp8", ISPAPolicy(k_fraction=0.5, t_warm=12))
    shared = sum(t.warmup for t in full.terms if t.kind in (TermKind.DIT_WEIGHTS, TermKind.ENCODERS))
    assert shared == sum(t.warmup for t in full.terms if t.per_model)
    both = compare_peak_bytes(full, ispa)
    assert max(full.peak_bytes, ispa.peak_bytes) < both < full.peak_bytes + ispa.peak_bytes - shared
    backend = PlannedBackend("fp8")
    check_run_fits(run_spec(COMPARE, "fp8"), backend, gpu_bytes=lambda device: both + CUDA_CONTEXT_BYTES)
    with pytest.raises(ValidationError, match="Compare at 704×384"):
        gpu = both + CUDA_CONTEXT_BYTES - 1
        check_run_fits(run_spec(COMPARE, "fp8"), backend, gpu_bytes=lambda device: gpu)


def test_on_a_pipeline_of_ranks_the_heaviest_rank_is_planned() -> None:
    layout = RankLayout.for_world(5)
    on_ranks, alone = PlannedBackend("bf16", layout), PlannedBackend("bf16")

    def heaviest_rank(kv_format: str, policy: Policy) -> int:
        plans = plan_roles(
            704, 384, model="14b", weights="bf16", kv_format=kv_format, policy=policy, layout=layout
        )
        assert len(plans) == 3  # rank 0, the other DiT ranks, the decoder rank
        return max(plan.peak_bytes for plan in plans.values())

    # bf16 weights, ISPA, fp8 KV: one GPU needs more than any rank of five.
    ispa = ISPAPolicy(k_fraction=0.5, t_warm=12)
    gpu = heaviest_rank("fp8", ispa) + CUDA_CONTEXT_BYTES
    assert one_gpu("bf16", "fp8", ispa).peak_bytes + CUDA_CONTEXT_BYTES > gpu
    check_run_fits(run_spec(ISPA, "fp8"), on_ranks, gpu_bytes=lambda device: gpu)
    with pytest.raises(ValidationError, match="This run does not fit the GPU: ISPA"):
        check_run_fits(run_spec(ISPA, "fp8"), alone, gpu_bytes=lambda device: gpu)
    with pytest.raises(ValidationError, match="fit the GPUs of the pipeline: ISPA .* on its heaviest rank"):
        check_run_fits(run_spec(ISPA, "fp8"), on_ranks, gpu_bytes=lambda device: gpu - 1)
    # The size chooser: the official size is offered on the ranks' GPUs, not on one such GPU.
    gpu = heaviest_rank(LIGHTEST_KV_FORMAT, FullPolicy()) + CUDA_CONTEXT_BYTES
    assert planned_peak(SIZES[0][1], "bf16") + CUDA_CONTEXT_BYTES > gpu
    offered_on_ranks, _ = sizes_for_gpu(on_ranks, gpu_bytes=lambda device: gpu)
    offered_alone, _ = sizes_for_gpu(alone, gpu_bytes=lambda device: gpu)
    assert SIZES[0] in offered_on_ranks and SIZES[0] not in offered_alone


ZERO_GPU_CARDS = {
    "H200 slice": 74_625_056_768,
    "RTX PRO 6000": 101_973_950_464,
}  # as spaces 0.51.3 reports them
KV_GIB = {"bf16": 31.0, "fp8": 17.0, "fp8-all": 16.0, "int4": 11.0, "int4+w": 13.3, "q2": 4.1, "q2+w": 7.0}
# about the 14B's at the official size


class SyntheticPlans(PlannedBackend):
    """Plans of made-up terms, cheap to build (the real planner builds the 14B DiT on `meta` for each): model
    weights held once per model, KV by format and area, ISPA's statistics; the selection is what is tested."""

    def memory_plans(self, height: int, width: int, policy: Policy, kv_format: str) -> list[MemoryPlan]:
        scale = height * width / (720 * 400)
        stats = 6 * GIB if isinstance(policy, ISPAPolicy) else 0
        terms = (
            Term(TermKind.DIT_WEIGHTS, "weights", 33 * GIB, 33 * GIB, "made up", per_model=True),
            Term(
                TermKind.KV_CACHE,
                "kv",
                int(KV_GIB[kv_format] * scale * GIB),
                int(KV_GIB[kv_format] * scale * GIB),
                "made up",
            ),
            Term(TermKind.ISPA_STATISTICS, "stats", stats, 0, "made up"),
        )
        return [MemoryPlan({"kv_format": kv_format}, terms)]


@pytest.mark.parametrize("card", ZERO_GPU_CARDS)
def test_the_size_chooser_names_exactly_the_kv_formats_that_fit_each_mode(card: str) -> None:
    from app.gpu_sizes import settings_that_fit
    from avatars.memory import fits_capacity
    from ispa import KV_FORMATS

    capacity = ZERO_GPU_CARDS[card]
    backend = SyntheticPlans()
    lines = settings_that_fit(backend, gpu_bytes=lambda device: capacity)
    assert len(lines) == len(SIZES)
    seen = set()
    for (label, area), line in zip(SIZES, lines, strict=True):
        height, width = planned_size(area, DIVISOR)

        def plan(policy: Policy, kv: str, height: int = height, width: int = width) -> MemoryPlan:
            return backend.memory_plans(height, width, policy, kv)[0]

        modes = {
            "Full": lambda kv: plan(FullPolicy(), kv).peak_bytes,
            "ISPA": lambda kv: plan(ISPAPolicy(), kv).peak_bytes,
            "compare": lambda kv: compare_peak_bytes(plan(FullPolicy(), kv), plan(ISPAPolicy(), kv)),
        }
        parts = []
        for mode, peak in modes.items():
            fitting = [kv for kv in KV_FORMATS if fits_capacity(peak(kv), capacity)]
            seen.add((mode, len(fitting)))
            parts.append(f"{mode} {', '.join(fitting) or 'none'}")
        assert line == f"{label}: " + "; ".join(parts)
    assert len({count for _, count in seen}) > 1  # the capacities draw lines between the formats
    assert settings_that_fit(backend, gpu_bytes=lambda device: None) == []
