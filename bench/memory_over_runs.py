"""Server memory over repeated runs of the same example: the process's RSS after each of N runs.

    python bench/memory_over_runs.py --runs 10 --seconds 3 --json
    python bench/memory_over_runs.py --runs 10 --distinct-prompts   # a new prompt every run
    python bench/memory_over_runs.py --runs 10 --served             # through the served app, one API client

What runs: `app.generation.run_generation` (the app's loop, as the server runs it for one request) on the tiny
test model, N times in one process with the same portrait, speech and prompt (or a new prompt each run), each run
as its own page (as N page loads would be: an owner token issued to it), whose run folder is removed when the page
closes, as the app does. After each run the garbage collector runs and the process's resident set size is read
from /proc/self/status. With --served the app is served in this process (`app.main.serve`, the middleware and the
sweeper included) and one gradio_client client, also in this process, sends the N requests one after the other, as
the issue's six runs in a row did: Gradio's own per-session state (stream segments, queue) is then part of the RSS.

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
from typing import Any

if __package__ in (None, ""):  # run as `python bench/memory_over_runs.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import soundfile as sf

from bench.app_requests import EXAMPLES, bench_temp_dir, example_request
from bench.compare_mode import machine


def rss_mb() -> float:
    """This process's resident set size in MB, from the kernel's own accounting."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError("no VmRSS in /proc/self/status")


def _direct_run(pipe: Any, prompt: str, seconds: float, tmp: Path, run: int) -> None:
    """One request through the app's generation loop, as its own page, whose folder goes when the page closes."""
    from app.generation import run_generation
    from app.sessions import SESSIONS

    spec = example_request(pipe, "ISPA", seconds, tmp, prompt=prompt)
    page = f"bench-memory-{run}"
    owner = SESSIONS.issue_token(page)
    for _ in run_generation(spec, "tiny", owner, live=False):
        pass
    SESSIONS.end_page(page)


_server: dict[str, Any] = {}


def _served_run(pipe: Any, prompt: str, seconds: float, tmp: Path, run: int) -> None:
    """One request to the served app from the same gradio_client client each time (one API session)."""
    from gradio_client import Client, handle_file

    if not _server:
        from app.main import build_demo, serve

        demo = build_demo()
        _, url, _ = serve(demo, prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
        _server.update(demo=demo, client=Client(url, verbose=False, download_files=False))
    audio, rate = sf.read(EXAMPLES / "fashion_blogger.wav", dtype="float32")
    speech = tmp / f"served-speech-{seconds:g}s.wav"
    sf.write(speech, audio[: round(seconds * rate)], rate)
    _server["client"].predict(
        handle_file(str(EXAMPLES / "fashion_blogger.jpg")), handle_file(str(speech)), "", prompt, "ISPA",
        0.5, 6, 1, "tiny", 1e-3, "default", "bf16", False, "memory-bench-owner-token-0123",
        api_name="/generate",
    )  # fmt: skip


def _close_server() -> None:
    if _server:
        _server["client"].close()
        _server["demo"].close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of speech (the example's)")
    parser.add_argument("--distinct-prompts", action="store_true", help="a new prompt every run")
    parser.add_argument("--served", action="store_true", help="through the served app and gradio_client")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with bench_temp_dir("bench-memory-") as tmp:
        from app.models import get_pipeline

        pipe = get_pipeline("tiny")
        start_mb = rss_mb()
        runner = _served_run if args.served else _direct_run
        rss, cache, portraits = [], [], []
        for run in range(args.runs):
            prompt = "a person talks in a warm studio" + (
                f", take {run + 1}" if args.distinct_prompts else ""
            )
            runner(pipe, prompt, args.seconds, tmp, run)
            gc.collect()
            rss.append(rss_mb())
            cache.append(pipe.text_encoder.cached_prompts)
            portraits.append(len(pipe.portrait_latents))
            print(
                f"run {run + 1:>2}: RSS {rss[-1]:8.1f} MB · text-encoder cache {cache[-1]} prompt(s)"
                f" · portrait cache {portraits[-1]}",
                flush=True,
            )
        _close_server()

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
        "served": args.served,
    }
    print(f"RSS over {args.runs} runs · {report['machine']} · tiny model · {args.seconds:g} s of speech each")
    print(
        f"before the runs: {start_mb:.1f} MB; after run 2: {rss[min(1, len(rss) - 1)]:.1f} MB; after run {len(rss)}: {rss[-1]:.1f} MB"
    )
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
