"""The estimates printed beside the suite's measurements, so the first GPU run shows model against measurement.

No time model of the 14B loop exists in code. The audit of 2026-12-01 left per-forward estimates for one H100/H200
(docs/performance.md, docs/several-gpus.md), so they hold at `--scale full` only; at any scale the stream stage adds
the memory model's KV and statistics bytes per variant (`Recorder.estimate`). Only torch-free constants here, so the
stages that run on a bare machine can import it.
"""

from __future__ import annotations

from typing import Any

from bench.suite.variants import parse_variant

AUDIT = "audit of 2026-12-01, one H100/H200"
FP8_ISPA_FORWARD_SECONDS = 0.28  # one FP8 + ISPA DiT forward after warmup at 14B, 704×384
ABSORB_SECONDS = 0.65  # the audit's 0.6-0.7 s for 40 layers at D = 5,120
STATISTICS_FAST_SECONDS_PER_FORWARD = 0.04  # G, C and s of 40 layers in fast (TF32) mode, per warmup forward
FORWARDS_PER_BLOCK = 4  # denoising steps (avatars.liveavatar.block_layout.DENOISING_STEPS)
FRAMES_PER_BLOCK = 12  # video frames (avatars.liveavatar.block_layout.VIDEO_FRAMES_PER_BLOCK)


def audit_estimates(scale_name: str, variants: list[str]) -> dict[str, dict[str, Any]]:
    """ "stage.key" → {"value", "basis"} for the figures the audit estimated, at full scale (none at tiny)."""
    if scale_name != "full":
        return {}
    found = {
        "engine.absorb_seconds": {"value": ABSORB_SECONDS, "basis": AUDIT},
        "engine.statistics_update_fast_seconds_per_forward": {
            "value": STATISTICS_FAST_SECONDS_PER_FORWARD,
            "basis": AUDIT,
        },
    }
    for variant in variants:
        if not variant.startswith("fp8-"):
            continue
        forwards = parse_variant(
            variant
        ).steps  # one forward per denoising step (FORWARDS_PER_BLOCK officially)
        block = forwards * FP8_ISPA_FORWARD_SECONDS
        found[f"stream.{variant}.ispa_dit_seconds_median_after_warmup"] = {
            "value": block,
            "basis": f"{AUDIT}: {forwards} × {FP8_ISPA_FORWARD_SECONDS} s per forward",
        }
        found[f"stream.{variant}.ispa_fps_after_warmup"] = {
            "value": FRAMES_PER_BLOCK / block,
            "basis": f"{AUDIT}: {FRAMES_PER_BLOCK} frames per {block:.2f} s DiT block, decode fully hidden",
        }
        found[f"stream.{variant}.absorb_seconds"] = {"value": ABSORB_SECONDS, "basis": AUDIT}
    return found
