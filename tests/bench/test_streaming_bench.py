"""bench/streaming.py on the tiny model: the JSON contract, its definitions, and the memory model against live bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from filelock import FileLock

from avatars.base import GenerationRequest
from bench.streaming import parse_args, run_policy
from ispa import FullPolicy
from tests.fixtures.chunk_reports import full_policy_report

REPO_ROOT = Path(__file__).resolve().parents[2]
BLOCKS, T_WARM = 3, 6  # warmup = 2 blocks, so the last block runs absorbed
POLICY_KEYS = {"kv_bytes_peak", "stats_bytes_peak", "peak_allocated_bytes", "block_seconds_median", "fps"}


# The benchmark's GPU machine has neither librosa nor soxr. One process without them (both made unimportable
# first) runs what --model 14b builds, `bench.random_pipeline`, at a small spec for one block, saying its frame
# count on stderr, then the benchmark on the tiny model: one interpreter start for both.
WITHOUT_LIBROSA_AND_SOXR = """
import runpy, sys
sys.modules['librosa'] = None
sys.modules['soxr'] = None
import torch
from tests.bench.test_random_pipeline import SMALL
from bench.random_pipeline import build_random_pipeline
from bench.streaming import make_request, run_policy
from ispa import FullPolicy
pipe = build_random_pipeline(SMALL, 'cpu', dtype=torch.float32)
print('random 14b builder frames:', run_policy(pipe, make_request('tiny', 1, 0), FullPolicy(), 1, 1)['frames'],
      file=sys.stderr)
sys.argv = ['bench/streaming.py', *sys.argv[1:]]
runpy.run_path('bench/streaming.py', run_name='__main__')
"""


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> SimpleNamespace:
    """The run above, made once per session: the first test worker to need it runs it, the others read its
    outcome (pytest-xdist's recipe: the workers' temp folders share a parent unique to the session)."""
    root = tmp_path_factory.getbasetemp()
    shared = (root if worker_id == "master" else root.parent) / "streaming-bench-run.json"
    with FileLock(f"{shared}.lock"):
        if not shared.is_file():
            command = [
                sys.executable,
                "-c",
                WITHOUT_LIBROSA_AND_SOXR,
                "--model",
                "tiny",
                "--blocks",
                str(BLOCKS),
            ]
            command += ["--t-warm", str(T_WARM), "--json"]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
            done = subprocess.run(
                command, cwd=REPO_ROOT, capture_output=True, text=True, check=False, env=env
            )
            shared.write_text(
                json.dumps({"code": done.returncode, "stdout": done.stdout, "stderr": done.stderr})
            )
        done = json.loads(shared.read_text())
    assert done["code"] == 0, done["stderr"]
    lines = done["stdout"].strip().splitlines()
    return SimpleNamespace(lines=lines, result=json.loads(lines[-1]), stderr=done["stderr"])


def test_prints_a_table_then_one_json_object_with_the_contract_keys(bench_run):
    lines, result = bench_run.lines, bench_run.result
    assert lines[0].startswith("device: CPU") and "model: tiny" in lines[0]
    assert sum(line.startswith("{") for line in lines) == 1
    assert {"warmup_overhead_ratio", "absorb_seconds", "device"} <= set(result)
    for policy in ("full", "ispa"):
        assert set(result[policy]) >= POLICY_KEYS, policy
        assert result[policy]["peak_allocated_bytes"] is None  # CUDA only
        assert len(result[policy]["blocks"]) == BLOCKS


def test_each_block_is_printed_as_it_is_measured_before_the_summary(bench_run):
    lines, result = bench_run.lines, bench_run.result
    summary = next(i for i, line in enumerate(lines) if i > 0 and line.startswith("device: "))
    rows = [line for line in lines[:summary] if " block " in line]
    expected = [("Full", b, "full") for b in result["full"]["blocks"]] + [
        ("ISPA", b, b["phase"]) for b in result["ispa"]["blocks"]
    ]
    assert len(rows) == len(expected) == 2 * BLOCKS
    for line, (policy, block, phase) in zip(rows, expected, strict=True):
        assert line.startswith(f"{policy:<5} block {block['index']:>3}  {phase}"), line
        assert f"DiT {block['dit_seconds']:.3f} s" in line


class _FailingPipe:
    """Stands in for a pipeline whose third block crashes (a CUDA error, an OOM, a kill by timeout)."""

    device = torch.device("cpu")

    def stream(self, request, control=None, group=None):
        for index in range(2):
            yield SimpleNamespace(index=index, report=full_policy_report(index, frames=12, end_seconds=0.48))
        raise RuntimeError("CUDA out of memory")


def test_rows_measured_before_a_crash_have_already_been_handed_over():
    seen = []
    with pytest.raises(RuntimeError, match="out of memory"):
        request = GenerationRequest(
            portrait=np.zeros((64, 64, 3), np.uint8), audio=np.zeros(1), sample_rate=16000
        )
        run_policy(_FailingPipe(), request, FullPolicy(), blocks=4, warmup_blocks=2, on_block=seen.append)
    assert [row["index"] for row in seen] == [0, 1] and seen[1]["dit_seconds"] == 0.1  # the fixture's timing


def test_the_14b_builder_needs_neither_librosa_nor_soxr(bench_run):
    """`bench.random_pipeline` (what --model 14b builds) at a small spec streams one block without them."""
    assert "random 14b builder frames: 9" in bench_run.stderr  # the first block drops 3 of its 12 frames


def test_ispa_warms_up_absorbs_and_then_holds_what_the_memory_model_predicts(bench_run):
    result = bench_run.result
    full, ispa, predicted = result["full"], result["ispa"], result["predicted"]
    assert [b["phase"] for b in ispa["blocks"]] == ["warmup", "warmup", "absorbed"]
    assert [b["event"] for b in ispa["blocks"]] == [None, "absorbed", None]
    assert {b["phase"] for b in full["blocks"]} == {"full"}
    # live tensors against the memory model, before and after the absorb
    assert full["kv_bytes_peak"] == full["kv_bytes_after_warmup"] == predicted["kv_bytes_full"]
    assert ispa["blocks"][0]["kv_bytes"] == full["blocks"][0]["kv_bytes"]  # warmup holds what Full holds
    assert (
        ispa["kv_bytes_after_warmup"]
        == predicted["kv_bytes_ispa_after_warmup"]
        < full["kv_bytes_after_warmup"]
    )
    assert result["kv_ratio_after_warmup"] == ispa["kv_bytes_after_warmup"] / full["kv_bytes_after_warmup"]
    assert full["stats_bytes_peak"] == 0
    assert ispa["stats_bytes_peak"] == predicted["stats_bytes"] > 0
    assert [b["stats_bytes"] for b in ispa["blocks"]] == [0, predicted["stats_bytes"], 0]
    assert ispa["absorb_seconds"] == result["absorb_seconds"] == ispa["blocks"][1]["absorb_seconds"] > 0
    assert full["absorb_seconds"] == 0


def test_timings_follow_their_definitions(bench_run):
    result = bench_run.result
    for name in ("full", "ispa"):
        policy = result[name]
        blocks = policy["blocks"]
        assert [b["frames"] for b in blocks] == [9, 12, 12]
        steady = blocks[1:]
        seconds = sum(b["dit_seconds"] + b["decode_seconds"] for b in steady)
        assert (
            policy["fps"] == pytest.approx(sum(b["frames"] for b in steady) / seconds) and policy["fps"] > 0
        )
        after = blocks[2:]
        assert policy["fps_after_warmup"] == pytest.approx(
            12 / (after[0]["dit_seconds"] + after[0]["decode_seconds"])
        )
        assert policy["dit_seconds_median_after_warmup"] == after[0]["dit_seconds"]
    ispa_blocks = result["ispa"]["blocks"]
    merge, stats, dit = (
        ispa_blocks[1][key] for key in ("merge_seconds", "statistics_seconds", "dit_seconds")
    )
    assert result["warmup_overhead_ratio"] == pytest.approx(merge / dit) and 0 < merge < dit
    assert result["statistics_overhead_ratio"] == pytest.approx(stats / dit) and 0 < stats < dit
    assert ispa_blocks[0]["merge_seconds"] == 0  # no history, nothing to merge
    attention = result["attention_decomposition"]
    extra = (attention["decomposed_seconds"] - attention["plain_seconds"]) * 4 * 4  # tiny: 4 layers x 4 steps
    assert result["decomposition_overhead_ratio"] == pytest.approx(
        extra / result["full"]["dit_seconds_median"]
    )


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (["--blocks", "0"], "--blocks"),
        (["--t-warm", "3"], "t_warm"),
        (["--k-fraction", "1.5"], "k_fraction"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_bad_arguments_are_refused(bad, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(bad)
    assert message in capsys.readouterr().err


def test_the_14b_model_needs_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        parse_args(["--model", "14b"])
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_a_kv_format_runs_through_the_bench_and_its_predictions():
    """`--kv-format`: both runs store their history that way, and the prediction counts that format's bytes."""
    from bench.streaming import load, make_request, predictions

    pipe = load("tiny", fp8=False)
    request = make_request("tiny", blocks=4, seed=0)
    height, width = pipe.output_size(request.portrait)
    by_format = {fmt: run_policy(pipe, request, FullPolicy(), 4, 2, kv_format=fmt) for fmt in ("bf16", "fp8")}
    for fmt, result in by_format.items():
        full_ring = result["blocks"][-1]["kv_bytes"]  # by block 3 every ring holds its 3 history blocks
        assert full_ring == predictions(pipe, height, width, 0.5, fmt)["kv_bytes_full"], fmt
    assert by_format["fp8"]["blocks"][-1]["kv_bytes"] < by_format["bf16"]["blocks"][-1]["kv_bytes"]
    assert parse_args(["--kv-format", "int4"]).kv_format == "int4"
