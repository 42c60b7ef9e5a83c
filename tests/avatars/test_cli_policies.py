"""The CLI's comparison policies: `--policy evict|window|salience` holds ISPA's KV bytes after warmup and makes a
video of its own (different from Full's and from ISPA's)."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from avatars.liveavatar.cli import main
from avatars.liveavatar.loading import build_tiny_pipeline

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "examples"
COMPARED = ("evict", "window", "salience")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[dict, np.ndarray]]:
    """Each policy's report and decoded frames, from 1.5 s of speech (4 blocks; t_warm 6: the transition ends
    block 1), at the tiny model's smaller size, on one tiny pipeline (which encodes the portrait once)."""
    folder = tmp_path_factory.mktemp("policies")
    samples, rate = sf.read(EXAMPLES / "fashion_blogger.wav", dtype="float32")
    speech = folder / "speech.wav"
    sf.write(speech, samples[: int(1.5 * rate)], rate)
    pipe = build_tiny_pipeline()
    results = {}
    for policy in ("full", "ispa", *COMPARED):
        out, report = folder / f"{policy}.mp4", folder / f"{policy}.json"
        argv = ["--model", "tiny", "--portrait", str(EXAMPLES / "man.png"), "--audio", str(speech),
                "--policy", policy, "--t-warm", "6", "--max-area", "4096", "--out", str(out), "--report", str(report)]  # fmt: skip
        assert main(argv, pipeline=pipe) == 0
        with av.open(str(out)) as container:
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        results[policy] = (json.loads(report.read_text()), frames)
    return results


@pytest.mark.parametrize("policy", COMPARED)
def test_a_comparison_policy_holds_ispas_kv_bytes_and_makes_its_own_video(runs, policy):
    report, frames = runs[policy]
    ispa_report, ispa_frames = runs["ispa"]
    _, full_frames = runs["full"]
    assert report["policy"] == policy
    blocks, ispa_blocks = report["blocks"], ispa_report["blocks"]
    assert len(blocks) == len(ispa_blocks) >= 4
    assert [b["phase"] for b in blocks] == ["warmup", "warmup"] + ["evicted"] * (len(blocks) - 2)
    for own, ispa in zip(blocks[1:], ispa_blocks[1:], strict=True):  # from the transition on
        assert abs(own["kv_bytes"] - ispa["kv_bytes"]) <= 0.1 * ispa["kv_bytes"]
        assert own["kv_bytes"] < 0.75 * own["kv_bytes_full_ring"] or own["index"] < 2
    assert frames.shape == full_frames.shape == ispa_frames.shape
    assert not np.array_equal(frames, full_frames)
    assert not np.array_equal(frames, ispa_frames)
