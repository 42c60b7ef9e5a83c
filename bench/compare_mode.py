"""Compare mode's cost against ISPA alone, through the app's own generation loop, in one process.

    python bench/compare_mode.py --seconds 4 --json                     # the tiny model at its own size
    python bench/compare_mode.py --seconds 4 --max-area 270336 --json   # at 704x384 (slow on a CPU)

What runs: `app.generation.run_generation` (the app's loop: the backend's chunks, the mp4 segments, the side
panels, and in compare mode the drift metrics) on the tiny test model, after one untimed Compare request that
pays the start-up costs, first an ISPA-only request, then a
Compare request (Full and ISPA advanced in lockstep) with the same portrait, speech and seed. `--max-area`
sets the video's pixel budget (the tiny model's own sizes are 128x64 and 64x64 areas; 704x384 is the real
model's default, where the drift metrics cost the most).

Definitions (per request):
- first_video_s: from the request's start to the first step that hands a video segment to the player.
- total_s: from the start to the last step (the final mp4s and the report).
- ratio_first_video, ratio_total: Compare / ISPA. The targets are at most 1.5 and 2.2.

Prints a table; with --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/compare_mode.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.app_requests import bench_temp_dir, example_request

TARGETS = {"ratio_first_video": 1.5, "ratio_total": 2.2}


def machine() -> str:
    """The CPU's model name (and the GPU's, where one is used), for the figures' label."""
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
        ]
        cpu = names[0] if names else cpu
    label = f"CPU {cpu}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        label += f", GPU {torch.cuda.get_device_name()}"
    return label


def timed_request(spec: Any, session: str) -> dict[str, float]:
    """first_video_s and total_s of one request through the app's generation loop."""
    from app.generation import run_generation

    started = time.perf_counter()
    first_video = None
    for outputs in run_generation(spec, "tiny", session, live=False):
        if first_video is None and isinstance(outputs.player_a, str):
            first_video = time.perf_counter() - started
    total = time.perf_counter() - started
    return {"first_video_s": first_video if first_video is not None else total, "total_s": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds of speech (the example's)")
    parser.add_argument(
        "--max-area", type=int, default=None, help="video pixel budget (default: the model's)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with bench_temp_dir("bench-compare-") as tmp:
        from app.models import get_pipeline

        pipe = get_pipeline("tiny")
        specs = {}
        for mode in ("ISPA", "Compare"):
            spec = example_request(pipe, mode, args.seconds, tmp)
            if args.max_area is not None:
                spec = dataclasses.replace(spec, max_area=args.max_area, size_label=f"{args.max_area} px")
            specs[mode] = spec
        # One-off start-up costs (each policy's first forward, ffmpeg's first start) are paid by an untimed
        # Compare request, which runs both policies.
        timed_request(specs["Compare"], "bench-warmup")
        results = {mode: timed_request(spec, f"bench-{mode}") for mode, spec in specs.items()}
        height, width = pipe.output_size(specs["ISPA"].portrait, specs["ISPA"].max_area)

    ispa, compare = results["ISPA"], results["Compare"]
    ratios = {
        "ratio_first_video": compare["first_video_s"] / ispa["first_video_s"],
        "ratio_total": compare["total_s"] / ispa["total_s"],
    }
    report = {
        "machine": machine(),
        "model": "tiny (untrained test model)",
        "speech_seconds": args.seconds,
        "video_size": f"{width}x{height}",
        "ispa": ispa,
        "compare": compare,
        **ratios,
        "targets": TARGETS,
        "meets_targets": all(ratios[k] <= v for k, v in TARGETS.items()),
    }
    print(
        f"compare mode vs ISPA alone · {report['machine']} · tiny model · {width}x{height} · {args.seconds:g} s"
    )
    print(f"{'request':<10}{'first video (s)':>17}{'total (s)':>12}")
    for name, row in (("ISPA", ispa), ("Compare", compare)):
        print(f"{name:<10}{row['first_video_s']:>17.2f}{row['total_s']:>12.2f}")
    print(
        f"{'ratio':<10}{ratios['ratio_first_video']:>17.2f}{ratios['ratio_total']:>12.2f}"
        f"   (targets ≤ {TARGETS['ratio_first_video']}, ≤ {TARGETS['ratio_total']})"
    )
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
