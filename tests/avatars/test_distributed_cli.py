"""The launch contract: `torchrun --standalone --nproc-per-node 3 -m avatars.liveavatar …` (CPU, gloo) writes the
same report blocks and the same video as the same command in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from avatars.liveavatar.cli import main
from avatars.liveavatar.loading import build_tiny_pipeline

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT.parent / "shared" / "examples"
TIMING_KEYS = {"seconds", "decode_seconds", "merge_seconds", "statistics_seconds", "absorb_seconds"}


def decoded_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_torchrun_three_processes_writes_the_one_process_report(tmp_path: Path):
    samples, rate = sf.read(EXAMPLES / "cyclops_baker.wav", dtype="float32")
    speech = tmp_path / "speech.wav"
    sf.write(speech, samples[: int(1.5 * rate)], rate)
    args = ["--model", "tiny", "--portrait", str(EXAMPLES / "cyclops_baker.jpg"), "--audio", str(speech),
            "--policy", "full", "--seed", "3", "--max-area", "4096"]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3"]
    command = [*torchrun, "-m", "avatars.liveavatar", *args,
               "--out", str(tmp_path / "three.mp4"), "--report", str(tmp_path / "three.json")]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    one_out, one_report = tmp_path / "one.mp4", tmp_path / "one.json"
    argv = [*args, "--out", str(one_out), "--report", str(one_report)]
    assert main(argv, pipeline=build_tiny_pipeline()) == 0

    ranks, one = json.loads((tmp_path / "three.json").read_text()), json.loads(one_report.read_text())
    assert ranks["pipeline"] == {"processes": 3, "dit_ranks": 2, "decoder_rank": 2}
    assert ranks["frames"] == one["frames"] > 0
    strip = [{k: v for k, v in block.items() if k not in TIMING_KEYS} for block in ranks["blocks"]]
    assert strip == [{k: v for k, v in block.items() if k not in TIMING_KEYS} for block in one["blocks"]]
    ranks_frames, one_frames = decoded_frames(tmp_path / "three.mp4"), decoded_frames(one_out)
    assert len(ranks_frames) == len(one_frames) and all(
        np.array_equal(a, b) for a, b in zip(ranks_frames, one_frames, strict=True)
    )
