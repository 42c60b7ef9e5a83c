"""bench/gpu_suite.py at tiny scale on the CPU: the contract CI relies on, and a SIGTERM mid-run keeping its figures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_suite import STAGES, main
from bench.suite.recorder import Recorder, StageSkipped, Target

REPO_ROOT = Path(__file__).resolve().parents[2]
STATUSES = {"ok", "failed", "skipped"}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    assert main(["--device", "cpu", "--scale", "tiny", "--out", str(out)]) == 0
    return out, json.loads((out / "summary.json").read_text())


def test_tiny_cpu_run_meets_the_contract(suite):
    out, summary = suite
    assert summary["device"].startswith("CPU") and summary["scale"] == "tiny"
    assert list(summary["stages"]) == list(STAGES)
    assert {name: stage["status"] for name, stage in summary["stages"].items()} == dict.fromkeys(STAGES, "ok")
    figures = {name: stage["figures"] for name, stage in summary["stages"].items()}
    assert (
        figures["environment"]["copy_bytes_per_s"] > 0 and figures["environment"]["cholesky_fp64_seconds"] > 0
    )
    assert figures["engine"]["absorb_nonfinite_layers"] == 0 and figures["engine"]["absorb_seconds"] > 0
    stream = figures["stream"]
    assert [row["phase"] for row in stream["native-eager.ispa_blocks"]] == ["warmup", "warmup", "absorbed"]
    assert len(stream["native-eager.full_blocks"]) == 3
    assert (
        stream["native-eager.ispa_kv_bytes_after_warmup"] < stream["native-eager.full_kv_bytes_after_warmup"]
    )
    table = (out / "table.md").read_text()
    for target in summary["targets"]:
        assert target["figure"] in table


def test_every_cpu_backend_matches_the_fp64_reference(suite):
    _, summary = suite
    checks = {k: v for k, v in summary["stages"]["attention"]["figures"].items()}
    assert len(checks) >= 7  # >= 2 backends x 3 key lengths (x 2 amplitudes), and the merge
    for name, errors in checks.items():
        assert errors["finite"], name
        assert errors["out_relative_error"] < 1e-5, name  # fp32 on the CPU
        assert errors["lse_max_abs_error"] < 1e-4, name


def test_a_failing_stage_is_recorded_and_the_next_one_runs(tmp_path):
    recorder = Recorder(tmp_path, {"device": "test"}, ["a", "b", "c"], [Target("b.x", "x", "≤", 1.0)])
    with recorder.stage("a"):
        recorder.record("taken", 1.5)
        raise RuntimeError("broken kernel")
    with recorder.stage("b"):
        recorder.record("x", 2.0)
    with recorder.stage("c"):
        raise StageSkipped("no GPU")
    stages = json.loads((tmp_path / "summary.json").read_text())["stages"]
    assert stages["a"]["status"] == "failed" and "broken kernel" in stages["a"]["error"]
    assert stages["a"]["figures"] == {"taken": 1.5}
    assert stages["b"] == {"status": "ok", "figures": {"x": 2.0}, "seconds": stages["b"]["seconds"]}
    assert stages["c"]["status"] == "skipped" and stages["c"]["reason"] == "no GPU"


def test_sigterm_mid_stage_leaves_a_valid_summary_with_the_figures_taken(tmp_path):
    command = [
        sys.executable,
        "bench/gpu_suite.py",
        "--device",
        "cpu",
        "--scale",
        "tiny",
        "--out",
        str(tmp_path),
    ]
    command += ["--stages", "environment,attention"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, env=env)
    for line in process.stdout:  # blocks until the suite has recorded its first accuracy figure
        if line.startswith("  attention."):
            break
    process.send_signal(signal.SIGTERM)
    process.stdout.read()
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    summary = json.loads((tmp_path / "summary.json").read_text())
    stages = summary["stages"]
    assert (
        stages["environment"]["status"] == "ok" and stages["environment"]["figures"]["copy_bytes_per_s"] > 0
    )
    assert stages["attention"]["status"] == "failed" and "SIGTERM" in stages["attention"]["error"]
    assert len(stages["attention"]["figures"]) >= 1
    assert {stage["status"] for stage in stages.values()} <= STATUSES
