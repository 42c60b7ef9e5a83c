"""Compare mode's cost against ISPA alone, through the app's own generation loop, in one process.

    python bench/compare_mode.py --seconds 4 --json                     # the tiny model at its own size
    python bench/compare_mode.py --seconds 4 --max-area 270336 --json   # at 704x384 (slow on a CPU)

What runs: `app.generation.run_generation` (the app's loop: the backend's chunks, the mp4 segments, the side
panels, and in compare mode the drift metrics) on the tiny test model, after one untimed Compare request that
pays the start-up costs: `--repeats` times an ISPA-only request, then a Compare request (the Full run alone until
its first video segment is out, then Full and ISPA in turn) with the same portrait, speech and seed. `--max-area`
sets the video's pixel budget (the tiny model's own sizes are 128x64 and 64x64 areas; 704x384 is the real
model's default, where the drift metrics cost the most).

Definitions (per request):
- first_video_s: from the request's start to the first step that hands a video segment to the (first) player.
- second_player_s: in compare mode, the same for the second player (the ISPA run's); not part of the targets.
- total_s: from the start to the last step (the final mp4s and the report).
Each figure is the smallest over the repeats (on a machine shared with other work, the one least slowed by it);
every repeat's figures are in the JSON's `samples`.
- ratio_first_video, ratio_total: Compare / ISPA of those figures. The targets are at most 1.5 and 2.2.

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
    """first_video_s and total_s of one request through the app's generation loop (and second_player_s in
    compare mode)."""
    from app.generation import run_generation

    started = time.perf_counter()
    firsts: dict[str, float] = {}
    for outputs in run_generation(spec, "tiny", session, live=False):
        for player in ("player_a", "player_b"):
            if player not in firsts and isinstance(getattr(outputs, player), str):
                firsts[player] = time.perf_counter() - started
    total = time.perf_counter() - started
    times = {"first_video_s": firsts.get("player_a", total), "total_s": total}
    if spec.mode == "Compare":
        times["second_player_s"] = firsts.get("player_b", total)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds of speech (the example's)")
    parser.add_argument(
        "--max-area", type=int, default=None, help="video pixel budget (default: the model's)"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="ISPA + Compare pairs timed (the least is kept)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")

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
        samples: dict[str, list[dict[str, float]]] = {mode: [] for mode in specs}
        for repeat in range(args.repeats):
            for mode, spec in specs.items():
                samples[mode].append(timed_request(spec, f"bench-{mode}-{repeat}"))
        height, width = pipe.output_size(specs["ISPA"].portrait, specs["ISPA"].max_area)

    ispa, compare = (
        {key: min(sample[key] for sample in samples[mode]) for key in samples[mode][0]}
        for mode in ("ISPA", "Compare")
    )
    ratios = {
        "ratio_first_video": compare["first_video_s"] / ispa["first_video_s"],
        "ratio_total": compare["total_s"] / ispa["total_s"],
    }
    report = {
        "machine": machine(),
        "model": "tiny (untrained test model)",
        "speech_seconds": args.seconds,
        "repeats": args.repeats,
        "video_size": f"{width}x{height}",
        "ispa": ispa,
        "compare": compare,
        **ratios,
        "targets": TARGETS,
        "meets_targets": all(ratios[k] <= v for k, v in TARGETS.items()),
        "samples": samples,
    }
    print(
        f"compare mode vs ISPA alone · {report['machine']} · tiny model · {width}x{height} · {args.seconds:g} s"
        f" · least of {args.repeats}"
    )
    print(f"{'request':<10}{'first video (s)':>17}{'total (s)':>12}")
    for name, row in (("ISPA", ispa), ("Compare", compare)):
        print(f"{name:<10}{row['first_video_s']:>17.2f}{row['total_s']:>12.2f}")
    print(
        f"(compare mode's second player, the ISPA run: first video after {compare['second_player_s']:.2f} s)"
    )
    print(
        f"{'ratio':<10}{ratios['ratio_first_video']:>17.2f}{ratios['ratio_total']:>12.2f}"
        f"   (targets ≤ {TARGETS['ratio_first_video']}, ≤ {TARGETS['ratio_total']})"
    )
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
