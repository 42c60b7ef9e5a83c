"""How far the windowed features of a long clip known in full are from the official one-pass features: a tiny
random-weight wav2vec2 (4 layers, the real 128-tap positional convolution), synthetic voiced speech.

    python -m bench.long_audio_windows --seconds 40
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from avatars.liveavatar.encoders.audio import AudioEncoder
from avatars.liveavatar.encoders.tiny import tiny_wav2vec2
from avatars.liveavatar.streaming import audio_timeline


def synthetic_speech(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    pitch = 120 + 40 * np.sin(2 * np.pi * 0.5 * t)
    voiced = 0.3 * np.sin(2 * np.pi * pitch * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (voiced + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def features(encoder: AudioEncoder, audio: np.ndarray, one_pass_max: float) -> torch.Tensor:
    audio_timeline.ONE_PASS_MAX_SECONDS = one_pass_max
    timeline = audio_timeline.AudioTimeline(audio, 16000, encoder)
    return torch.cat([block[:n] for block, n in timeline.feature_blocks()])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=40.0)
    args = parser.parse_args()
    encoder = AudioEncoder(
        *tiny_wav2vec2(0, num_layers=4, conv_dim=32, positional_taps=128, positional_groups=16)
    )
    audio = synthetic_speech(args.seconds)
    started = time.perf_counter()
    whole = features(encoder, audio, float("inf"))
    one_pass_s = time.perf_counter() - started
    started = time.perf_counter()
    windowed = features(encoder, audio, 0.0)
    windowed_s = time.perf_counter() - started
    per_frame = (windowed - whole).flatten(1).norm(dim=1) / whole.flatten(1).norm(dim=1)
    rel = ((windowed - whole).norm() / whole.norm()).item()
    group = audio_timeline.LONG_CLIP_WINDOWS["group_frames"]
    seams = per_frame[group - 2 : group + 2].tolist()
    print(
        f"{args.seconds:.0f} s, {len(whole)} frames: rel. Frobenius {rel:.4f}, worst frame {per_frame.max():.4f}, "
        f"median {per_frame.median():.4f}; around the first seam {[f'{x:.4f}' for x in seams]}; "
        f"one pass {one_pass_s:.1f} s, windows {windowed_s:.1f} s (CPU)"
    )


if __name__ == "__main__":
    main()
