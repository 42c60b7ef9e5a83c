"""Speech → one wav2vec2 feature per video frame, the way LiveAvatar's official pipeline computes it.

Steps (official `s2v/audio_encoder.py`): audio at 16 kHz, normalised to zero mean and unit variance over the whole
clip (the checkpoint's feature extractor, `do_normalize`); `Wav2Vec2ForCTC` with all hidden states kept (25 for
wav2vec2-large: CNN/projection output + 24 layers) at 50 Hz; linear interpolation (align_corners) to
`int(T / 50 * 30)` steps at 30 Hz; then, for video frame k at 25 fps, the 30 Hz step `round(1.2 k)` (the
`m = 0` bucket, one step per frame). Frames whose step lies past the audio are not returned (the official
code zero-fills them up to a multiple of the clip length).

Output layout: [frames, hidden_states, dim] (the official bucket's layout before it is permuted for the DiT).

Numerics: the official pipeline runs wav2vec2 in bf16 and casts the features to bf16. An encoder whose model is
bf16 (the 14B loader's default) does the same: hidden states in bf16, features interpolated in fp32 and rounded
to bf16 (returned as fp32 tensors holding bf16 values). An fp32 model (`--audio-fp32`, and the tiny CPU test model)
keeps fp32 throughout.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

from avatars.media.audio import pcm_to_float32, resample
from ispa.checks import check_positive_int

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
VIDEO_FPS = 25
WAV2VEC_RATE = 50  # hidden-state rate of wav2vec2's conv front end at 16 kHz (stride 320)
INTERMEDIATE_RATE = 30  # the official code's `video_rate`, interpolated to before picking per-frame steps


def audio_16k(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """Mono float32 at 16 kHz from PCM at `sample_rate`, through the project's one PCM conversion and resampler."""
    check_positive_int(sample_rate, "sample_rate")
    mono = pcm_to_float32(samples)
    if mono.size == 0:
        raise ValueError("audio is empty (zero samples)")
    return resample(mono, sample_rate, SAMPLE_RATE)


def num_video_frames(num_steps_30hz: int) -> int:
    """How many 25 fps video frames get a feature: those whose 30 Hz step `round(1.2 k)` exists."""
    # round(1.2 k) == (6k + 2) // 5 for every integer k (1.2 k never ends in .5), so count k with (6k+2)//5 < n.
    return max(0, (5 * num_steps_30hz + 3) // 6)


def frame_steps_30hz(frames: torch.Tensor) -> torch.Tensor:
    """The 30 Hz step each video frame index takes its feature from: round(1.2 k)."""
    return (6 * frames + 2) // 5


def official_frame_features(hidden_states: torch.Tensor) -> torch.Tensor:
    """[layers, T, dim] at 50 Hz → [frames, layers, dim], one per 25 fps video frame, as the official code."""
    steps_50hz = hidden_states.shape[1]
    steps_30hz = int(steps_50hz / float(WAV2VEC_RATE) * INTERMEDIATE_RATE)
    frames = num_video_frames(steps_30hz)
    if frames == 0:
        raise ValueError(f"audio too short: {steps_50hz} wav2vec2 steps give no video frame")
    at_30hz = F.interpolate(
        hidden_states.float().transpose(1, 2), size=steps_30hz, mode="linear", align_corners=True
    ).transpose(1, 2)
    return at_30hz[:, frame_steps_30hz(torch.arange(frames))].permute(1, 0, 2).contiguous()


class AudioEncoder:
    """wav2vec2 (the CTC checkpoint shipped in Wan2.2-S2V-14B) with its feature extractor."""

    def __init__(self, model: Wav2Vec2ForCTC, feature_extractor: Wav2Vec2FeatureExtractor) -> None:
        if feature_extractor.sampling_rate != SAMPLE_RATE:
            raise ValueError(
                f"feature extractor expects {feature_extractor.sampling_rate} Hz, not {SAMPLE_RATE}"
            )
        self.model = model.eval().requires_grad_(False)
        self.feature_extractor = feature_extractor

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> AudioEncoder:
        """Load `wav2vec2-large-xlsr-53-english/` (config.json, preprocessor_config.json and the weights)."""
        model = Wav2Vec2ForCTC.from_pretrained(str(folder), dtype=dtype).to(device)
        return cls(model, Wav2Vec2FeatureExtractor.from_pretrained(str(folder)))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype wav2vec2 runs in: bf16 (the official numerics) or fp32."""
        return next(self.model.parameters()).dtype

    def round_features(self, features: torch.Tensor) -> torch.Tensor:
        """Features rounded to the model's dtype, as the official code casts them (a no-op for an fp32 model)."""
        return features if self.dtype == torch.float32 else features.to(self.dtype).float()

    @property
    def num_hidden_states(self) -> int:
        return self.model.config.num_hidden_layers + 1

    def num_steps(self, num_samples: int) -> int:
        """wav2vec2 steps (50 Hz) for a clip of `num_samples` 16 kHz samples: the conv front end's output length."""
        length = num_samples
        for kernel, stride in zip(self.model.config.conv_kernel, self.model.config.conv_stride, strict=True):
            length = max(0, (length - kernel) // stride + 1)
        return length

    @property
    def hop(self) -> int:
        """16 kHz samples between consecutive wav2vec2 steps (320 for the default front end)."""
        return int(np.prod(self.model.config.conv_stride))

    @property
    def receptive_field(self) -> int:
        """16 kHz samples one wav2vec2 step reads (400 for the default front end)."""
        samples = 1
        for kernel, stride in reversed(
            list(zip(self.model.config.conv_kernel, self.model.config.conv_stride, strict=True))
        ):
            samples = (samples - 1) * stride + kernel
        return samples

    @property
    def min_samples(self) -> int:
        """Fewest samples that give two wav2vec2 steps, the least the 30 Hz interpolation can use."""
        return self.receptive_field + self.hop

    @torch.no_grad()
    def hidden_states(self, audio_16k: np.ndarray) -> torch.Tensor:
        """All hidden states [layers, T, dim] (float32, on CPU) of one clip, normalised as a whole."""
        if audio_16k.size < self.min_samples:
            raise ValueError(
                f"audio too short: {audio_16k.size} samples at 16 kHz, at least {self.min_samples} are needed"
            )
        inputs = self.feature_extractor(
            audio_16k, sampling_rate=SAMPLE_RATE, return_tensors="pt"
        ).input_values
        param = next(self.model.parameters())
        out = self.model.wav2vec2(
            inputs.to(device=param.device, dtype=param.dtype), output_hidden_states=True
        )
        return torch.stack([h[0] for h in out.hidden_states]).float().cpu()

    def frame_features(self, audio: np.ndarray, sample_rate: int) -> torch.Tensor:
        """One feature per 25 fps video frame, [frames, layers, dim], for a whole clip of PCM at `sample_rate`."""
        return self.round_features(official_frame_features(self.hidden_states(audio_16k(audio, sample_rate))))
