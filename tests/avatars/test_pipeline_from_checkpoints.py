"""The real-weights path end to end: official-layout tiny checkpoints → loader → pipeline → chunks, offline."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from avatars.base import GenerationRequest
from avatars.liveavatar.cli import main
from avatars.liveavatar.loading import available_models, build_liveavatar_pipeline, load_pipeline
from avatars.liveavatar.weights.hub import resolve_weights
from ispa import ISPAPolicy
from tests.fixtures.tiny_checkpoints import write_tiny_weights


def test_tiny_checkpoints_stream_through_the_real_loading_path(tmp_path):
    written = write_tiny_weights(tmp_path / "weights", dtype=torch.float32)
    pipe = build_liveavatar_pipeline(resolve_weights(tmp_path / "weights"), device="cpu", dtype=torch.float32)
    assert not pipe.is_test_model and pipe.dit.config.num_layers == 4
    assert pipe.audio_encoder.dtype == torch.bfloat16  # the official numerics, whatever the DiT's dtype

    # The LoRA was merged into the loaded weights: W = W0 + 0.5 · B @ A for a self-attention output projection.
    name = "blocks.1.self_attn.o"
    down, up = written.lora_factors[name]
    expected = written.dit_state[f"{name}.weight"].float() + 0.5 * up.float() @ down.float()
    torch.testing.assert_close(pipe.dit.state_dict()[f"{name}.weight"], expected, rtol=1e-6, atol=1e-6)

    rng = np.random.default_rng(0)
    portrait = rng.integers(0, 256, size=(200, 120, 3), dtype=np.uint8)
    audio = (0.1 * np.sin(2 * np.pi * 220 * np.arange(24000) / 16000)).astype(np.float32)
    request = GenerationRequest(portrait=portrait, audio=audio, sample_rate=16000, seed=1)
    chunks = list(pipe.stream(replace(request, policy=ISPAPolicy(t_warm=6), max_area=128 * 64)))
    assert sum(len(c.frames) for c in chunks) > 24
    assert all(np.isfinite(c.audio).all() for c in chunks)
    assert chunks[-1].report.engine.phase == "absorbed"


def test_14b_without_a_gpu_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "GPU" in available_models()["14b"]
    with pytest.raises(RuntimeError, match="GPU"):
        load_pipeline("14b")
    audio = tmp_path / "a.wav"
    sf.write(audio, np.zeros(16000, np.float32) + 0.01, 16000)
    portrait = tmp_path / "p.png"
    Image.new("RGB", (64, 64), "white").save(portrait)
    argv = [
        "--model",
        "14b",
        "--portrait",
        str(portrait),
        "--audio",
        str(audio),
        "--out",
        str(tmp_path / "v.mp4"),
    ]
    assert main(argv) == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().err
