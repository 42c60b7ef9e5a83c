"""The hyperparameters of the Wan2.2-S2V DiT, named exactly as the checkpoint's `config.json` names them.

`DiTConfig.from_dict(json.load(...))` reads the official file; `PRESETS` holds the 14B checkpoint's values and
a tiny configuration (same classes, random weights) for CPU tests. Keys that select training-time variants
this project does not implement (the transformer motioner, TSM, trainable tokens, other AdaIN modes) are kept
so a config round-trips, and are validated to hold the only values the released checkpoint uses.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ispa.checks import check_positive_int, is_int

logger = logging.getLogger(__name__)

# Keys diffusers writes into every config.json; they describe the file, not the model.
_FILE_KEYS = ("_class_name", "_diffusers_version")

_LIST_FIELDS = ("patch_size", "window_size", "audio_inject_layers")

# Keys whose only supported value is the released checkpoint's (name -> value).
_FIXED_VALUES: dict[str, Any] = {
    "model_type": "s2v",
    "patch_size": (1, 2, 2),
    "window_size": (-1, -1),
    "qk_norm": True,
    "cross_attn_norm": True,
    "enable_adain": True,
    "adain_mode": "attn_norm",
    "zero_timestep": True,
    "enable_motioner": False,
    "add_last_motion": True,
    "trainable_token": False,
    "enable_tsm": False,
    "enable_framepack": True,
    "framepack_drop_mode": "padd",
}


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of the causal Wan2.2-S2V DiT. Defaults are the Wan2.2-S2V-14B checkpoint's values."""

    # Transformer
    dim: int = 5120
    ffn_dim: int = 13824
    freq_dim: int = 256  # sinusoidal timestep features fed to time_embedding
    num_heads: int = 40
    num_layers: int = 40
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)
    window_size: tuple[int, int] = (-1, -1)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    in_dim: int = 16  # VAE latent channels
    out_dim: int = 16
    # Text (umT5-XXL states, zero-padded to text_len)
    text_dim: int = 4096
    text_len: int = 512
    # Audio (wav2vec2 hidden states -> causal audio encoder -> injection after some blocks)
    audio_dim: int = 1024
    num_audio_token: int = 4  # local audio tokens per latent frame (plus one learned padding token)
    num_audio_hidden_states: int = 25  # wav2vec2-large: CNN/projection output + 24 transformer layers
    audio_inject_layers: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    enable_adain: bool = True
    adain_mode: str = "attn_norm"
    # Conditioning tokens: reference frame, FramePack motion frames, pose
    motion_frames: int = 73  # video frames of motion context; also the audio's official left padding
    cond_dim: int = 16  # pose-latent channels; 0 drops cond_encoder
    zero_init: bool = True  # zero the audio-injection outputs, cond_encoder and cond-mask at construction
    zero_timestep: bool = True
    enable_framepack: bool = True
    framepack_drop_mode: str = "padd"
    add_last_motion: bool = True
    enable_motioner: bool = False
    enable_tsm: bool = False
    trainable_token: bool = False
    model_type: str = "s2v"

    def __post_init__(self) -> None:
        # config.json stores these as lists; keep them as tuples so the frozen config stays hashable.
        for name in _LIST_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, list | tuple) or not all(is_int(v) for v in value):
                raise ValueError(f"{name} must be a list of integers, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        self._validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> DiTConfig:
        """Build from a parsed `config.json`; metadata is ignored, unknown keys are logged (not fatal)."""
        if not isinstance(config, Mapping):
            raise ValueError(f"config must be a mapping (parsed config.json), got {type(config).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if k not in known and k not in _FILE_KEYS)
        if unknown:
            logger.warning("DiTConfig: ignoring unknown config keys %s", unknown)
        return cls(**{k: v for k, v in config.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the official key names (tuples become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def _validate(self) -> None:
        positive = ("dim", "ffn_dim", "freq_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim")
        positive += ("text_len", "audio_dim", "num_audio_token", "num_audio_hidden_states", "motion_frames")
        for name in positive:
            check_positive_int(getattr(self, name), name)
        if not is_int(self.cond_dim) or self.cond_dim < 0:
            raise ValueError(f"cond_dim must be a non-negative integer, got {self.cond_dim!r}")
        if not (isinstance(self.eps, int | float) and self.eps > 0):
            raise ValueError(f"eps must be a positive number, got {self.eps!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim {self.head_dim} must be even and ≥ 6 for the 3-axis RoPE")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even, got {self.freq_dim}")
        if self.dim % 4:
            raise ValueError(f"dim must be divisible by 4 (audio encoder widths), got {self.dim}")
        layers = self.audio_inject_layers
        if len(set(layers)) != len(layers) or any(not 0 <= i < self.num_layers for i in layers):
            raise ValueError(
                f"audio_inject_layers must be distinct block indices in [0, {self.num_layers}), "
                f"got {list(layers)}"
            )
        if self.motion_frames % 4 != 1:
            # The audio of latent frame j must end on video frame 4j+3, which the official left padding of
            # `motion_frames` copies achieves only when motion_frames ≡ 1 (mod 4).
            raise ValueError(f"motion_frames must be ≡ 1 (mod 4), got {self.motion_frames}")
        for name, expected in _FIXED_VALUES.items():
            if getattr(self, name) != expected:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not supported; "
                    f"the released checkpoint uses {expected!r}"
                )


PRESETS: dict[str, DiTConfig] = {
    "14b": DiTConfig(),
    # Matches the tiny encoders of `encoders.tiny` (wav2vec2 hidden 32 with 2 layers -> 3 hidden states, T5
    # d_model 32, VAE z_dim 16). Default tiny video: 64×64 (latent 8×8).
    "tiny": DiTConfig(
        dim=64,
        ffn_dim=128,
        freq_dim=32,
        num_heads=4,
        num_layers=4,
        audio_inject_layers=(0, 2),
        audio_dim=32,
        text_dim=32,
        text_len=16,
        num_audio_hidden_states=3,
    ),
}

TINY_VIDEO_SIZE = (64, 64)  # (height, width) in pixels for the tiny preset: 16 tokens per latent frame
