"""The prepared GPU run: one command that measures every figure of the performance table, in stages.

    python bench/gpu_suite.py --device cuda --scale full --out OUT     # one H200/H100, ≤ 9 minutes
    python bench/gpu_suite.py --device cpu --scale tiny --out OUT      # CPU, shapes scaled down (CI runs this)
    python bench/gpu_suite.py --table OUT                              # re-render OUT/table.md from OUT/summary.json

Stages (each records its figures as it measures them; a failing stage is recorded and the next one runs):
  environment  GPU, driver, clocks (nvidia-smi), torch, CUDA, cuDNN, packages; ceilings at the model's shapes: copy
               bandwidth, bf16 and FP8 GEMM (3,168 × 5,120 × 13,824), fp32/TF32 GEMM at the statistics shape,
               fp64 GEMM and Cholesky at D = 5,120.
  attention    every installed backend's out and LSE against fp64 on the device, Lk ∈ {5,808, 9,504, 15,312},
               q/k amplitude 1 and 3; local + history merged against the fp64 union.
  engine       warmup (decomposed) overhead and L-layer speedup of one layer; statistics update exact vs fast;
               the absorb of 40 layers at D = 5,120 (seconds, extra peak memory, non-finite layers).
  stream       bench/streaming.py's loop, Full then ISPA, per variant (native/fp8 × eager/compiled): a row per
               block as it happens, then peaks during/after warmup, KV and statistics bytes, DiT and decode
               seconds, decode hidden by the overlap, FPS after warmup, ISPA speedup (decode overlap on, then
               off), compiled vs eager. A variant's error is recorded as its outcome and the next variant runs
               (ISPA_SUITE_FAIL_VARIANT=<name> fails one at its start); a variant predicted to end past --budget-s,
               counted from the suite's start (compiled: its eager twin's time + a compile estimate), is skipped.
               Issue 20's levers ride on a base after '+' (fp8-compiled+steps3, +stats-bf16, +merge-fused,
               +quant-fused, +decode-gpu1; bench/suite/variants.py), each row with its speedup over the base.
  table        OUT/table.md from whatever OUT/summary.json holds.

OUT/summary.json is rewritten after every measurement and on SIGTERM (what `timeout` sends), so a timeout or a crash
keeps every figure already taken: {"device", "scale", "stages": {name: {"status": "ok"|"failed"|"skipped",
"figures": {...}, "error"|"reason"}}, "targets": [...], "estimates": {figure: {"value", "basis"}}}. Figures with a
target in the issue's table are printed against it when measured, and beside a model's estimate where one exists
(the memory model's bytes at any scale; the audit's seconds at full scale). `--scale tiny` divides token counts and D by 16, heads and head_dim by 4, and streams the
tiny test model for 3 blocks (bench/suite/scales.py has the whole mapping); its figures say nothing about 14B.

Offline install on a bare CUDA machine (torch + transformers there, no diffusers, librosa or soxr; no network).
Only the stream stage needs diffusers; librosa and soxr are optional (audio files, resampling). Here, with network,
the three plus those of their requirements the device's image lacks (its package list: the device README's KINDS.md),
without dependencies (8.4 MB on 2026-12-02; with every dependency it is 46 wheels, 144 MB):
    python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \\
        --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata librosa==0.11.0 \\
        soxr==1.1.0 audioread decorator pooch platformdirs soundfile cffi pycparser
Carry .whl to the machine (e.g. the device tool's `carry`), then there:
    python -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 540 python bench/gpu_suite.py --device cuda \\
        --scale full --out OUT
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python bench/gpu_suite.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.attention import device_name
from bench.suite.engine import absorb, attention_paths, statistics_update
from bench.suite.estimates import audit_estimates
from bench.suite.kernels import attention_accuracy, ceilings, environment
from bench.suite.recorder import Recorder, Target, exit_on_sigterm
from bench.suite.scales import SCALES, Scale
from bench.suite.stream import DEFAULT_VARIANTS, VARIANTS, check_variants, streaming
from bench.suite.table import write_table
from bench.suite.variants import LEVERS

STAGES = ("environment", "attention", "engine", "stream", "table")
# No streaming variant predicted to end later than 8 minutes after the suite's start (of its 9; the table needs none).
FULL_BUDGET_SECONDS = 480.0


def targets(variants: list[str]) -> list[Target]:
    """The issue's targets, for the variants this run streams."""
    found = [
        Target("engine.absorb_seconds", "absorb, every layer at D", "≤", 1.0),
        Target("engine.l_layer_speedup", "L-layer attention speedup (one layer)", "measured"),
        Target("engine.warmup_attention_overhead", "decomposed vs plain attention (one layer)", "measured"),
    ]
    for variant in variants:
        precision = variant.split("-")[0]
        speedup = 1.15 if precision == "fp8" else 1.08
        found += [
            Target(
                f"stream.{variant}.ispa_fps_after_warmup",
                f"FPS after warmup, ISPA 0.5, {variant}",
                "≥",
                12.0,
                25.0,
            ),
            Target(
                f"stream.{variant}.dit_speedup_after_warmup",
                f"DiT ISPA vs Full after warmup, {variant}",
                "≥",
                speedup,
            ),
            Target(
                f"stream.{variant}.dit_speedup_after_warmup_overlap_off",
                f"DiT ISPA vs Full after warmup, decode overlap off, {variant}",
                "measured",
            ),
            Target(
                f"stream.{variant}.decomposition_overhead_per_block",
                f"warmup overhead per block, {variant}",
                "≤",
                0.01,
            ),
            Target(
                f"stream.{variant}.statistics_share_of_warmup_dit",
                f"statistics share of warmup DiT, {variant}",
                "≤",
                0.10,
            ),
            Target(
                f"stream.{variant}.ispa_decode_hidden_share",
                f"decode hidden by the overlap, {variant}",
                "≥",
                0.80,
            ),
        ]
        if "+" in variant:
            found.append(
                Target(
                    f"stream.{variant}.dit_speedup_vs_base",
                    f"DiT ISPA after warmup, {variant} vs {variant.split('+')[0]}",
                    "measured",
                )
            )
    for precision in sorted({v.split("-")[0] for v in variants if v.endswith("compiled")}):
        found.append(
            Target(
                f"stream.{precision}.compiled_vs_eager_dit_speedup",
                f"compiled vs eager, {precision}",
                "measured",
            )
        )
    return found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--scale", choices=sorted(SCALES), default=None, help="default: full on CUDA, tiny on CPU"
    )
    parser.add_argument("--out", type=Path, help="folder for summary.json and table.md")
    parser.add_argument(
        "--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}"
    )
    parser.add_argument(
        "--variants",
        default=None,
        help=f"streaming variants in order, from {','.join(VARIANTS)}, each optionally with levers after '+' "
        f"({', '.join(LEVERS)}; e.g. fp8-compiled+steps3; default per scale)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="seconds from the suite's start by which a streaming variant must be predicted to end, or it is "
        f"skipped (full: {FULL_BUDGET_SECONDS:g})",
    )
    parser.add_argument("--table", type=Path, default=None, metavar="DIR", help="only re-render DIR/table.md")
    args = parser.parse_args(argv)
    if args.table is not None:
        return args
    if args.out is None:
        parser.error("--out is required (or --table DIR)")
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    args.scale = SCALES[args.scale or ("full" if args.device.type == "cuda" else "tiny")]
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        parser.error(f"--stages: unknown {unknown}; choose from {','.join(STAGES)}")
    try:
        names = args.variants.split(",") if args.variants else list(DEFAULT_VARIANTS[args.scale.name])
        args.variants = check_variants([n.strip() for n in names if n.strip()])
    except ValueError as err:
        parser.error(f"--variants: {err}")
    if args.scale.name == "full" and args.device.type != "cuda":
        parser.error("--scale full builds the 14B model: it needs --device cuda")
    if args.budget_s is None and args.scale.name == "full":
        args.budget_s = FULL_BUDGET_SECONDS
    return args


def main(argv: list[str] | None = None) -> int:
    suite_started = time.perf_counter()  # the streaming budget counts from here
    args = parse_args(argv)
    if args.table is not None:
        print(write_table(args.table))
        return 0
    device, scale = args.device, args.scale
    header = {
        "suite": "bench/gpu_suite.py",
        "device": device_name(device),
        "scale": scale.name,
        "shapes": scale.shapes,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(
            [sys.executable, "bench/gpu_suite.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "torch": torch.__version__,
    }
    estimates = audit_estimates(scale.name, args.variants)
    recorder = Recorder(args.out, header, list(STAGES), targets(args.variants), estimates)
    exit_on_sigterm(recorder)
    print(f"device: {header['device']}  scale: {scale.name}  summary: {recorder.path}", flush=True)
    runs = {
        "environment": lambda: _environment(recorder, device, scale),
        "attention": lambda: attention_accuracy(recorder, device, scale),
        "engine": lambda: _engine(recorder, device, scale),
        "stream": lambda: streaming(recorder, device, scale, args.variants, args.budget_s, suite_started),
        "table": lambda: recorder.record("path", str(args.out / "table.md")) or write_table(args.out),
    }
    for name in STAGES:
        if name not in args.stages:
            recorder.skip(name, "not asked for (--stages)")
            continue
        with recorder.stage(name):
            runs[name]()
    print(write_table(args.out), flush=True)
    return 0


def _environment(recorder: Recorder, device: torch.device, scale: Scale) -> None:
    for key, value in environment(device).items():
        recorder.record(key, value)
    ceilings(recorder, device, scale)


def _engine(recorder: Recorder, device: torch.device, scale: Scale) -> None:
    attention_paths(recorder, device, scale)
    statistics_update(recorder, device, scale)
    absorb(recorder, device, scale)


if __name__ == "__main__":
    raise SystemExit(main())
