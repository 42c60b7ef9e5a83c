"""bench/attention.py runs end to end at a tiny size and keeps its JSON contract (one object on the last line)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.attention import parse_args

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "bench/attention.py", *args]  # the documented way to run it
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)


def test_bench_prints_a_table_and_one_json_object_last():
    done = run_bench(
        "--device", "cpu", "--scale", "0.01", "--heads", "2", "--head-dim", "16", "--absorb-dim", "32",
        "--warmup", "0", "--repeats", "1", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("device: CPU")
    result = json.loads(lines[-1])
    assert result["shapes"] == {
        "heads": 2,
        "head_dim": 16,
        "queries": 32,  # 3168 x 0.01
        "local_keys": 26 + 32,
        "history_keys": 95,
        "full_keys": 26 + 32 + 95,
        "absorb_dim": 32,
    }
    seconds, ratios = result["seconds"], result["ratios"]
    assert set(seconds) == {"full", "local_history_merge", "local", "merge", "absorb_step", "stats_update"}
    assert all(value > 0 for value in seconds.values())
    assert ratios["warmup_overhead"] == pytest.approx(seconds["local_history_merge"] / seconds["full"])
    assert ratios["local_speedup"] == pytest.approx(seconds["full"] / seconds["local"])


@pytest.mark.parametrize("bad", [["--scale", "0"], ["--queries", "0"], ["--repeats", "0"]])
def test_bench_rejects_bad_sizes(bad, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu", *bad])
    assert "must be" in capsys.readouterr().err
