"""Server memory over repeated runs of the same example: the process's RSS after each of N runs.

    python bench/memory_over_runs.py --runs 10 --seconds 3 --json
    python bench/memory_over_runs.py --runs 10 --distinct-prompts   # a new prompt every run

What runs: `app.generation.run_generation` (the app's loop, as the server runs it for one request) on the tiny
test model, N times in one process with the same portrait, speech and prompt (or a new prompt each run), each run
as its own page (as N page loads would be: an owner token issued to it), whose run folder is removed when the page
closes, as the app does. After each run the garbage collector runs and the process's resident set size is read
from /proc/self/status.

Definitions:
- rss_mb: VmRSS after each run, in MB (10^6 bytes); growth_after_second_mb: the last run's RSS minus the second
  run's (the target is flat: a few MB of allocator noise).
- text_cache_entries: prompts held by the text encoder's per-prompt cache after each run (bounded by
  `DEFAULT_MAX_CACHED_PROMPTS`); portrait_cache_entries: portraits whose latents the pipeline keeps (bounded by
  `CACHED_PORTRAITS`).

Prints a table; with --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/memory_over_runs.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.app_requests import bench_temp_dir, example_request
from bench.compare_mode import machine


def rss_mb() -> float:
    """This process's resident set size in MB, from the kernel's own accounting."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of speech (the example's)")
    parser.add_argument("--distinct-prompts", action="store_true", help="a new prompt every run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with bench_temp_dir("bench-memory-") as tmp:
        from app.generation import run_generation
        from app.models import get_pipeline
        from app.sessions import SESSIONS

        pipe = get_pipeline("tiny")
        start_mb = rss_mb()
        rss, cache, portraits = [], [], []
        for run in range(args.runs):
            prompt = "a person talks in a warm studio" + (
                f", take {run + 1}" if args.distinct_prompts else ""
            )
            spec = example_request(pipe, "ISPA", args.seconds, tmp, prompt=prompt)
            page = f"bench-memory-{run}"
            owner = SESSIONS.issue_token(page)
            for _ in run_generation(spec, "tiny", owner, live=False):
                pass
            SESSIONS.end_page(page)
            gc.collect()
            rss.append(rss_mb())
            cache.append(pipe.text_encoder.cached_prompts)
            portraits.append(len(pipe.portrait_latents))
            print(
                f"run {run + 1:>2}: RSS {rss[-1]:8.1f} MB · text-encoder cache {cache[-1]} prompt(s)"
                f" · portrait cache {portraits[-1]}",
                flush=True,
            )

    report = {
        "machine": machine(),
        "model": "tiny (untrained test model)",
        "speech_seconds": args.seconds,
        "rss_before_runs_mb": start_mb,
        "rss_mb": rss,
        "growth_after_second_mb": rss[-1] - rss[1] if len(rss) > 1 else None,
        "text_cache_entries": cache,
        "portrait_cache_entries": portraits,
        "distinct_prompts": args.distinct_prompts,
    }
    print(f"RSS over {args.runs} runs · {report['machine']} · tiny model · {args.seconds:g} s of speech each")
    print(
        f"before the runs: {start_mb:.1f} MB; after run 2: {rss[min(1, len(rss) - 1)]:.1f} MB; after run {len(rss)}: {rss[-1]:.1f} MB"
    )
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
