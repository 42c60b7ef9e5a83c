"""The causal audio encoder: all wav2vec2 hidden states of each video frame -> audio tokens per latent frame.

Per latent frame it yields `num_audio_token` local tokens plus one learned padding token (the context of the
audio cross-attention) and one global token (the condition of the AdaLN in front of it). A learned
softmax-like mix (SiLU weights, normalised) combines the wav2vec2 layers; three causal Conv1d layers (kernel
3, strides 1, 2, 2, replicate left padding) reduce 4 video frames to 1 latent frame. It runs in fp32, as the
official code does.

Blocks. Latent frame j depends on video frames [4j − 5, 4j + 3] only (receptive field 9 frames, ending on
the frame group 4j..4j+3). LiveAvatar's recipe for a block — prepend `motion_frames` (73) copies of the block's
first frame and drop the first (73 + 3) // 4 = 19 outputs — is therefore the same as prepending
AUDIO_LEFT_CONTEXT = 5 copies of it, which is what `block_audio_window` builds. The official loop encodes
every 12-frame block in isolation like this, and so do we: the distilled model was run that way.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

VIDEO_FRAMES_PER_LATENT = 4  # total stride of the conv stack
AUDIO_LEFT_CONTEXT = 5  # video frames before a latent frame group that its encoding reads


class AudioTokens(NamedTuple):
    """What the DiT needs from the audio of a block of F latent frames."""

    tokens: torch.Tensor  # [B, F, num_audio_token + 1, dim]: cross-attention context per latent frame
    global_token: torch.Tensor  # [B, F, 1, dim]: AdaLN condition per latent frame


class CausalConv1d(nn.Module):
    """Conv1d that only looks back: left padding of kernel − 1 frames by replicating the first frame."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.left_pad = kernel_size - 1
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C_in, T] fp32 -> [N, C_out, ceil(T / stride)] fp32 (the DiT keeps this module in fp32)."""
        return self.conv(F.pad(x, (self.left_pad, 0), mode="replicate"))


def _norm_silu(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free LayerNorm over channels, then SiLU, on x [N, C, T]."""
    x = F.layer_norm(x.transpose(1, 2), (x.shape[1],), eps=1e-6)
    return F.silu(x).transpose(1, 2)


class AudioConvEncoder(nn.Module):
    """The conv stack (`casual_audio_encoder.encoder` in the checkpoint); local and global paths share it."""

    def __init__(self, audio_dim: int, dim: int, num_tokens: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.conv1_local = CausalConv1d(audio_dim, dim // 4 * num_tokens, stride=1)
        self.conv1_global = CausalConv1d(audio_dim, dim // 4, stride=1)
        self.conv2 = CausalConv1d(dim // 4, dim // 2, stride=2)
        self.conv3 = CausalConv1d(dim // 2, dim, stride=2)
        self.final_linear = nn.Linear(dim, dim)

    def _downsample(self, x: torch.Tensor) -> torch.Tensor:
        """[N, dim/4, T] after conv1 -> [N, T/4, dim]."""
        x = self.conv2(_norm_silu(x))
        x = self.conv3(_norm_silu(x))
        return _norm_silu(x).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> AudioTokens:
        """x [B, audio_dim, T] fp32 -> local tokens [B, T', num_tokens + 1, dim], global [B, T', 1, dim]."""
        batch = x.shape[0]
        # 1. Local path: conv1 makes num_tokens channel groups that go through the shared stack as a batch
        local = self.conv1_local(x)  # [B, n·dim/4, T]
        local = local.unflatten(1, (self.num_tokens, -1)).flatten(0, 1)  # [B·n, dim/4, T]
        local = self._downsample(local)  # [B·n, T', dim]
        local = local.unflatten(0, (batch, self.num_tokens)).transpose(1, 2)  # [B, T', n, dim]
        padding = self.padding_tokens.expand(batch, local.shape[1], 1, -1)
        local = torch.cat((local, padding), dim=2)  # [B, T', n + 1, dim]
        # 2. Global path: one token per latent frame, through the same stack and a final linear
        glob = self._downsample(self.conv1_global(x))  # [B, T', dim]
        glob = self.final_linear(glob)
        return AudioTokens(tokens=local, global_token=glob.unsqueeze(2))


class CausalAudioEncoder(nn.Module):
    """`casual_audio_encoder` (sic, the checkpoint's spelling): layer mix + conv encoder."""

    def __init__(self, num_hidden_states: int, audio_dim: int, dim: int, num_tokens: int) -> None:
        super().__init__()
        self.weights = nn.Parameter(torch.full((1, num_hidden_states, 1, 1), 0.01))
        self.encoder = AudioConvEncoder(audio_dim, dim, num_tokens)

    def forward(self, features: torch.Tensor) -> AudioTokens:
        """features [B, num_hidden_states, audio_dim, T], a column per video frame -> tokens per 4 frames."""
        weights = F.silu(self.weights)
        mixed = (features.float() * weights / weights.sum(dim=1, keepdim=True)).sum(
            dim=1
        )  # [B, audio_dim, T]
        return self.encoder(mixed)


def block_audio_window(features: torch.Tensor, start_frame: int, num_frames: int) -> torch.Tensor:
    """The encoder's input for video frames [start_frame, start_frame + num_frames), as the official loop builds it.

    features: [B, num_hidden_states, audio_dim, T], one column per video frame from frame 0 of the stream.
    Returns [B, num_hidden_states, audio_dim, AUDIO_LEFT_CONTEXT + num_frames]: the frames preceded by
    AUDIO_LEFT_CONTEXT copies of the first of them. Both ends must fall on latent-frame boundaries (multiples
    of 4 video frames).
    """
    if features.ndim != 4:
        raise ValueError(
            f"features must be [B, hidden_states, audio_dim, frames], got {tuple(features.shape)}"
        )
    if start_frame < 0 or start_frame % VIDEO_FRAMES_PER_LATENT:
        raise ValueError(f"start_frame must be a non-negative multiple of 4, got {start_frame}")
    if num_frames <= 0 or num_frames % VIDEO_FRAMES_PER_LATENT:
        raise ValueError(f"num_frames must be a positive multiple of 4, got {num_frames}")
    if start_frame + num_frames > features.shape[-1]:
        raise ValueError(
            f"frames [{start_frame}, {start_frame + num_frames}) exceed the "
            f"{features.shape[-1]} frames of features"
        )
    frames = torch.arange(start_frame - AUDIO_LEFT_CONTEXT, start_frame + num_frames, device=features.device)
    return features.index_select(-1, frames.clamp(min=start_frame))
