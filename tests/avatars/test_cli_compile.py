"""`python -m avatars.liveavatar ... --compile` on the CPU with the tiny model: the regions are compiled and the run
writes its video and report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

from avatars.liveavatar.cli import main
from avatars.liveavatar.compiled import COMPILE_ENV, DIT_REGIONS
from avatars.liveavatar.loading import build_tiny_pipeline, load_pipeline

EXAMPLES = Path(__file__).resolve().parents[2].parent / "shared" / "examples"


def test_compile_flag_compiles_the_regions_and_the_run_completes(tmp_path):
    samples, rate = sf.read(EXAMPLES / "fashion_blogger.wav", dtype="float32")
    speech = tmp_path / "speech.wav"
    sf.write(speech, samples[: int(1.2 * rate)], rate)
    pipe = build_tiny_pipeline()
    out, report_path = tmp_path / "v.mp4", tmp_path / "r.json"
    argv = ["--portrait", str(EXAMPLES / "man.png"), "--audio", str(speech), "--policy", "full", "--compile",
            "--max-area", str(64 * 64), "--out", str(out), "--report", str(report_path)]  # fmt: skip
    assert main(argv, pipeline=pipe) == 0
    report = json.loads(report_path.read_text())
    assert report["settings"]["compile"] is True and report["frames"] > 0 and out.stat().st_size > 0
    modules = list(pipe.dit.modules())
    compiled = [name for _, cls, name in DIT_REGIONS for m in modules if type(m) is cls and name in vars(m)]
    injections = len(pipe.dit.config.audio_inject_layers)
    assert len(compiled) == 3 * len(pipe.dit.blocks) + 2 * injections  # 3 regions per block, 2 per injection
    assert all(np.isfinite(block["seconds"]) for block in report["blocks"])


def test_ispa_compile_env_compiles_what_load_pipeline_builds(monkeypatch):
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    assert "attention_input" not in vars(load_pipeline("tiny").dit.blocks[0])
    monkeypatch.setenv(COMPILE_ENV, "1")
    block = load_pipeline("tiny").dit.blocks[0]
    assert "attention_input" in vars(block) and "project_local" in vars(block.self_attn)
