"""Live (streaming) wav2vec2 features against the official whole-clip ones, per second of audio.

    python bench/live_audio_fidelity.py            # CPU, random-weight wav2vec2, a few minutes
    python bench/live_audio_fidelity.py --json

Each clip is fed in 1-s pieces to `StreamingAudioEncoder` and compared with `AudioEncoder.frame_features` on the
whole clip (bit-equal to the official computation). Per frame: ‖live − whole‖ / ‖whole‖ over all hidden states; a
second's figure is the mean over its 25 frames. Two sweeps: the read-grid offset (at the default window), then
the window (left context, lookahead) at the default offset. The clip lengths cover the five cases of the official
grid's drift (it depends on the 50 Hz step count mod 5). The model is a random wav2vec2 with the real layout at a
small width (4 layers, 128-tap positional convolution); audio is synthetic speech-like harmonics. Random weights
make adjacent 50 Hz steps far less alike than the real model's, so the figures size the method, not the real
model's deviation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avatars.liveavatar.encoders.audio import SAMPLE_RATE, AudioEncoder
from avatars.liveavatar.encoders.audio_stream import StreamingAudioEncoder
from avatars.liveavatar.encoders.tiny import tiny_wav2vec2

# 50 Hz step counts 249, 250, 501, 502, 1003: mod 5 = 4, 0, 1, 2, 3.
LENGTHS_S = (5.0, 5.02, 10.04, 10.06, 20.08)
OFFSETS = (0.0, 0.25, 0.5, 0.75, 1.0)
WINDOWS_S = ((1.0, 0.2), (2.0, 0.2), (4.0, 0.2), (8.0, 0.2), (4.0, 0.5), (4.0, 1.0))


def random_wav2vec2(seed: int = 0) -> AudioEncoder:
    """The tiny wav2vec2 made deeper, with the real 128-tap positional convolution, so windows matter."""
    model = tiny_wav2vec2(seed, num_layers=4, conv_dim=32, positional_taps=128, positional_groups=16)
    return AudioEncoder(*model)


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    """Harmonics of a gliding pitch with a syllable-rate envelope, plus a little noise."""
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 140 * (1 + 0.2 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    voice = sum(np.sin(h * phase) / h for h in (1, 2, 3, 4))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t)
    noise = 0.01 * np.random.default_rng(seed).standard_normal(t.size)
    return (0.2 * voice * envelope + noise).astype(np.float32)


def live_features(encoder: AudioEncoder, audio: np.ndarray, **settings: float) -> torch.Tensor:
    stream = StreamingAudioEncoder(encoder, SAMPLE_RATE, group_frames=12, **settings)
    out = [stream.push(audio[i : i + SAMPLE_RATE]) for i in range(0, audio.size, SAMPLE_RATE)]
    return torch.cat([*out, stream.finish()])


def compare(live: torch.Tensor, whole: torch.Tensor) -> dict:
    per_frame = (live - whole).flatten(1).norm(dim=1) / whole.flatten(1).norm(dim=1)
    per_second = [round(float(s.mean()), 4) for s in per_frame.split(25)]
    rel_fro = float((live - whole).norm() / whole.norm())
    return {"rel_fro": round(rel_fro, 4), "max_per_second": max(per_second), "per_second": per_second}


def measure(encoder: AudioEncoder) -> list[dict]:
    defaults = StreamingAudioEncoder(encoder, SAMPLE_RATE).settings
    sweeps = [{**defaults, "read_offset_steps": o} for o in OFFSETS]
    sweeps += [{**defaults, "left_context_s": left, "lookahead_s": ahead} for left, ahead in WINDOWS_S]
    rows = []
    for seconds in LENGTHS_S:
        audio = speech(seconds)
        whole = encoder.frame_features(audio, SAMPLE_RATE)
        for settings in sweeps:
            row = {
                "seconds": seconds,
                **settings,
                **compare(live_features(encoder, audio, **settings), whole),
            }
            print(json.dumps({k: v for k, v in row.items() if k != "per_second"}), file=sys.stderr)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print every row as JSON")
    args = parser.parse_args()
    rows = measure(random_wav2vec2())
    if args.json:
        print(json.dumps({"device": "cpu", "rows": rows}, indent=1))
        return
    for row in rows:
        print(
            f"{row['seconds']:>6.2f} s  left {row['left_context_s']:>3} s  ahead {row['lookahead_s']:>3} s  "
            f"offset {row['read_offset_steps']:>4}: rel_fro {row['rel_fro']:.3f}  per second {row['per_second']}"
        )


if __name__ == "__main__":
    main()
