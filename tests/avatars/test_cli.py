"""`python -m avatars.liveavatar`: an mp4 with audio and the JSON report from the shared example inputs."""

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
import torch

from avatars.liveavatar.cli import main
from avatars.liveavatar.encoders.vae import StreamingDecoder
from avatars.liveavatar.loading import build_tiny_pipeline
from avatars.liveavatar.portrait_latents import PortraitLatents
from avatars.liveavatar.schedule import DenoisingSchedule

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT.parent / "shared" / "examples"
BLOCK_KEYS = {
    "index",
    "phase",
    "kv_bytes",
    "kv_bytes_full_ring",
    "kv_bytes_full_unbounded",
    "stats_bytes",
    "l_layers",
    "seconds",
}


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline()


@pytest.fixture
def short_speech(tmp_path: Path) -> Path:
    """The first 2.5 s of an example recording (24 kHz), so the test runs a handful of blocks."""
    samples, rate = sf.read(EXAMPLES / "fashion_blogger.wav", dtype="float32")
    path = tmp_path / "speech.wav"
    sf.write(path, samples[: int(2.5 * rate)], rate)
    return path


def test_cli_writes_mp4_with_audio_and_report(tmp_path, short_speech):
    out, report_path = tmp_path / "out" / "video.mp4", tmp_path / "out" / "report.json"
    command = [
        sys.executable, "-m", "avatars.liveavatar", "--model", "tiny",
        "--portrait", str(EXAMPLES / "fashion_blogger.jpg"), "--audio", str(short_speech),
        "--max-area", "4096", "--policy", "ispa", "--k-fraction", "0.5", "--t-warm", "6",
        "--out", str(out), "--report", str(report_path),
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # the tests' one-thread setting, for the child process too
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr

    report = json.loads(report_path.read_text())
    assert report["model"] == "tiny" and report["policy"] == "ispa" and report["fps"] == 25
    assert "untrained" in report["model_label"]
    assert report["settings"]["refresh_sink"] is False
    assert all(set(block) >= BLOCK_KEYS for block in report["blocks"])
    assert report["frames"] == sum(block["frames"] for block in report["blocks"])
    phases = [block["phase"] for block in report["blocks"]]
    assert phases[:2] == ["warmup", "warmup"] and set(phases[2:]) == {"absorbed"}
    assert len(report["blocks"][-1]["l_layers"]) == 2

    with av.open(str(out)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert video.codec_context.name == "h264" and audio.codec_context.name == "aac"
        frames = sum(1 for _ in container.decode(video=0))
    assert frames == report["frames"]
    with av.open(str(out)) as container:
        samples = sum(f.samples for f in container.decode(audio=0))
    rate = sf.info(short_speech).samplerate
    assert abs(samples - frames / 25 * rate) <= 1024 + 2  # within one AAC frame (encoder priming trimmed)


def test_full_policy_reports_no_local_layers(tmp_path, short_speech, pipe, monkeypatch):
    out, report_path = tmp_path / "v.mp4", tmp_path / "r.json"
    argv = ["--portrait", str(EXAMPLES / "man.png"), "--audio", str(short_speech), "--max-area", "4096", "--policy", "full",
            "--refresh-sink", "--out", str(out), "--report", str(report_path)]  # fmt: skip
    prefills = []
    prefill_sink = pipe.dit.prefill_sink
    monkeypatch.setattr(pipe.dit, "prefill_sink", lambda *a: prefills.append(a) or prefill_sink(*a))
    assert main(argv, pipeline=pipe) == 0
    report = json.loads(report_path.read_text())
    assert report["settings"]["refresh_sink"] is True
    assert report["settings"]["steps"] == 4  # the official schedule unless asked otherwise
    assert len(report["blocks"]) > 4 and len(prefills) == 2  # the flag reached the run: refreshed at clip 1
    assert {block["phase"] for block in report["blocks"]} == {"full"}
    assert all(block["l_layers"] == [] for block in report["blocks"])
    assert report["blocks"][-1]["kv_bytes"] == report["blocks"][-1]["kv_bytes_full_ring"]


def test_three_steps_run_three_official_timesteps_on_three_rings_and_are_recorded(
    tmp_path, pipe, monkeypatch
):
    samples, rate = sf.read(EXAMPLES / "fashion_blogger.wav", dtype="float32")
    speech, report_path = tmp_path / "speech.wav", tmp_path / "r.json"
    sf.write(speech, samples[: int(0.5 * rate)], rate)  # 2 blocks
    argv = ["--portrait", str(EXAMPLES / "man.png"), "--audio", str(speech), "--policy", "full",
            "--steps", "3", "--out", str(tmp_path / "v.mp4"), "--report", str(report_path)]  # fmt: skip
    forwards = []
    forward_block = pipe.dit.forward_block

    def recorded(session, latents, timestep, *args, ring, **kwargs):
        forwards.append((timestep, ring, session.cache.layers[0].layout.num_rings))
        return forward_block(session, latents, timestep, *args, ring=ring, **kwargs)

    monkeypatch.setattr(pipe.dit, "forward_block", recorded)
    z = (
        pipe.vae.vae.config.z_dim
    )  # zero portrait latents: no 365-frame motion encode (only the steps matter here)
    monkeypatch.setattr(pipe.portrait_latents, "get", lambda fitted: PortraitLatents(*(
        torch.zeros(1, z, frames, fitted.shape[0] // 8, fitted.shape[1] // 8) for frames in (1, 92))))  # fmt: skip
    assert main(argv, pipeline=pipe) == 0
    report = json.loads(report_path.read_text())
    assert report["settings"]["steps"] == 3
    expected = [(t, ring, 3) for ring, t in enumerate(DenoisingSchedule.liveavatar(3).timesteps)]
    assert forwards == expected * len(report["blocks"])


def test_kv_format_is_passed_to_the_session_and_recorded(tmp_path, short_speech, pipe):
    reports = {}
    for kv_format in ("bf16", "int4"):
        report_path = tmp_path / f"{kv_format}.json"
        argv = ["--portrait", str(EXAMPLES / "man.png"), "--audio", str(short_speech), "--max-area", "4096", "--policy", "full",
                "--kv-format", kv_format, "--out", str(tmp_path / f"{kv_format}.mp4"),
                "--report", str(report_path)]  # fmt: skip
        assert main(argv, pipeline=pipe) == 0
        reports[kv_format] = json.loads(report_path.read_text())
        assert reports[kv_format]["settings"]["kv_format"] == kv_format
    bf16, int4 = reports["bf16"]["blocks"][-1], reports["int4"]["blocks"][-1]
    # the same sink (bf16 in both) and the same history tokens, stored in fewer bytes
    assert int4["kv_bytes"] == int4["kv_bytes_full_ring"] < bf16["kv_bytes"]


def test_an_unknown_kv_format_is_refused(tmp_path, short_speech, capsys):
    argv = ["--portrait", str(EXAMPLES / "man.png"), "--audio", str(short_speech), "--kv-format", "int3",
            "--out", str(tmp_path / "v.mp4")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "--kv-format" in capsys.readouterr().err


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    text = tmp_path / "notes.txt"
    text.write_text("not media")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes((EXAMPLES / "cyclops_baker.jpg").read_bytes()[:200])
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    portrait, speech = str(EXAMPLES / "cyclops_baker.jpg"), str(EXAMPLES / "cyclops_baker.wav")
    return {
        "text as portrait": (["--portrait", str(text), "--audio", speech], "portrait"),
        "truncated jpeg": (["--portrait", str(truncated), "--audio", speech], "portrait"),
        "missing portrait": (
            ["--portrait", str(tmp_path / "nope.png"), "--audio", speech],
            "could not be found",
        ),
        "text as audio": (["--portrait", portrait, "--audio", str(text)], "audio"),
        "empty audio": (["--portrait", portrait, "--audio", str(empty)], "empty"),
        "absurd size": (["--portrait", portrait, "--audio", speech, "--max-area", "7"], "max_area"),
        "bad k": (["--portrait", portrait, "--audio", speech, "--k-fraction", "1.5"], "k_fraction"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "text as portrait",
        "truncated jpeg",
        "missing portrait",
        "text as audio",
        "empty audio",
        "absurd size",
        "bad k",
    ],
)
def test_bad_input_exits_non_zero_with_one_line_reason(tmp_path, capsys, pipe, case):
    argv, expected = _bad_inputs(tmp_path)[case]
    out = tmp_path / "video.mp4"
    assert main([*argv, "--out", str(out)], pipeline=pipe) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and expected in err and "\n" not in err
    assert not out.exists()


def test_decoder_warmup_and_audio_dtype_are_chosen_and_recorded(tmp_path, short_speech, pipe, monkeypatch):
    warmups = []
    original = StreamingDecoder.decode_block

    def decode_block(decoder, latents):
        if decoder.latent_frames_done == 0 and latents.shape[2] > 3:  # the warm-up on the motion latents
            warmups.append(latents.shape[2])
            latents = latents[:, :, -1:]  # keep the test fast: the choice is what is checked
        return original(decoder, latents)

    monkeypatch.setattr(StreamingDecoder, "decode_block", decode_block)
    report_path = tmp_path / "r.json"
    argv = ["--portrait", str(EXAMPLES / "man.png"), "--audio", str(short_speech), "--max-area", "4096", "--policy", "full",
            "--decoder-warmup", "all", "--out", str(tmp_path / "v.mp4"), "--report", str(report_path)]  # fmt: skip
    try:
        assert main(argv, pipeline=pipe) == 0
    finally:
        pipe.decoder_warmup = "sink"
    settings = json.loads(report_path.read_text())["settings"]
    assert warmups == [92] and settings["decoder_warmup"] == "all"
    assert settings["audio_encoder"] == "fp32"  # the tiny model's wav2vec2; the 14B loads it in bf16
