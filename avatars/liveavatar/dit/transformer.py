"""LiveAvatarDiT: the Wan2.2-S2V-14B DiT as LiveAvatar runs it causally, block by block, over a KV cache.

Parameter names and shapes are the official checkpoint's (`state_dict()` matches
`diffusion_pytorch_model-*.safetensors` key for key), so weights load without renaming.

A streaming run, as the pipeline drives it (the pipeline owns the loop and the ISPA session; the model keeps
no state between calls):

    context = model.embed_text(t5_states)                                   # once per run
    session = AttentionSession(policy, num_layers=cfg.num_layers, layout=CacheLayout(
        block_tokens=3 * model.tokens_per_frame(h, w), history_blocks=3, num_rings=4, frames_per_block=3))
    model.prefill_sink(session, ref_latent, motion_latents, context)       # fills every layer's sink at t = 0
    for block k (latent frames 3k..3k+2, video frames 12k..12k+11):
        audio = model.encode_audio(block_audio_window(features, 12 * k, 12))
        for step i, timestep t_i:
            flow = model.forward_block(session, latents, t_i, context, audio, frame_index=3 * k, ring=i,
                                       ref_shift=rng.randint(4, 30))
            latents = euler_step(latents, flow, σ_i, σ_{i+1})
        session.end_block()

Differences from the official code, all deliberate: RoPE angles come from positions in float64 (no
45,000-frame table, no complex-half rounding) and rotate in ≥ fp32; the sink is prefilled once, not once
per denoising step (the four official passes compute the same thing). With float64 angles, a 4-layer model
loaded with the same weights reproduced the official `CausalWanModel_S2V` (sink K/V and flow predictions) to
~2e-5 in fp32 (a one-off comparison against the official code, not part of the test suite).
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from avatars.liveavatar.config import DiTConfig
from avatars.liveavatar.dit.attention import SinkPrefillAttention, StreamingAttention
from avatars.liveavatar.dit.audio_encoder import (
    AUDIO_LEFT_CONTEXT,
    VIDEO_FRAMES_PER_LATENT,
    AudioTokens,
    CausalAudioEncoder,
)
from avatars.liveavatar.dit.audio_injector import AudioInjector
from avatars.liveavatar.dit.blocks import TransformerBlock
from avatars.liveavatar.dit.framepack import FramePackMotioner
from avatars.liveavatar.dit.head import Head
from avatars.liveavatar.dit.layers import sinusoidal_embedding
from avatars.liveavatar.dit.positions import (
    REF_BASE_TIME,
    block_positions,
    motion_token_count,
    ref_time,
    sink_positions,
)
from avatars.liveavatar.dit.rope import rope_angles
from avatars.liveavatar.dit.text_context import TextContext

if TYPE_CHECKING:
    from ispa import AttentionSession

# trainable_cond_mask rows: which kind of token a row of the sequence is.
NOISY_TOKEN, REF_TOKEN, MOTION_TOKEN = 0, 1, 2
MAX_REF_SHIFT = REF_BASE_TIME


# The modules that compute in fp32 whatever the model's dtype (the official code runs them under fp32 autocast).
# They are stored in fp32 once - at construction, on `.to(dtype)` and at load (`stored_dtype`) - so no forward
# re-casts their weights (time_projection alone is 157 M parameters at 14B).
FP32_MODULES = ("time_embedding", "time_projection", "head", "casual_audio_encoder")


def stored_dtype(parameter_name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a floating parameter or buffer of the DiT is kept in when the model runs in `dtype`."""
    in_fp32 = any(parameter_name.startswith(module + ".") for module in FP32_MODULES)
    return torch.float32 if in_fp32 else dtype


class LiveAvatarDiT(nn.Module):
    """The causal Wan2.2-S2V DiT. Build with `from_config` (also on the `meta` device, for weight loading)."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        patch = tuple(c.patch_size)
        # Attribute order = the checkpoint's key order.
        self.patch_embedding = nn.Conv3d(c.in_dim, c.dim, kernel_size=patch, stride=patch)
        self.text_embedding = nn.Sequential(
            nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"), nn.Linear(c.dim, c.dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, 6 * c.dim))
        self.blocks = nn.ModuleList(
            TransformerBlock(c.dim, c.ffn_dim, c.num_heads, c.eps) for _ in range(c.num_layers)
        )
        self.head = Head(c.dim, c.out_dim * math.prod(patch), c.eps)
        # Pose conditioning; LiveAvatar has no pose video and feeds zero latents (see forward_block).
        self.cond_encoder = (
            nn.Conv3d(c.cond_dim, c.dim, kernel_size=patch, stride=patch) if c.cond_dim else None
        )
        self.casual_audio_encoder = CausalAudioEncoder(
            c.num_audio_hidden_states, c.audio_dim, c.dim, c.num_audio_token
        )
        self.audio_injector = AudioInjector(c.dim, c.num_heads, len(c.audio_inject_layers), c.eps)
        self.trainable_cond_mask = nn.Embedding(3, c.dim)
        self.frame_packer = FramePackMotioner(c.in_dim, c.dim)
        # Injector i serves the i-th injected block in block order (as the official module scan assigns them).
        self.injector_of_block = {block: i for i, block in enumerate(sorted(c.audio_inject_layers))}
        if c.zero_init:
            self._zero_init()
        self._keep_fp32_modules()

    def _keep_fp32_modules(self) -> None:
        for name in FP32_MODULES:
            self.get_submodule(name).float()

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 - nn.Module's own signature
        # `.to(dtype)`, `.bfloat16()` and the like go through here: cast, then put the fp32 modules back.
        super()._apply(fn, recurse)
        self._keep_fp32_modules()
        return self

    @classmethod
    def from_config(cls, config: DiTConfig) -> LiveAvatarDiT:
        """Fresh weights; inside `with torch.device("meta"):` nothing is allocated before loading."""
        return cls(config)

    def _zero_init(self) -> None:
        """The official zero_init: modules added on top of Wan start as no-ops."""
        zeroed = [self.trainable_cond_mask, *self.audio_injector.injector_adain_layers]
        zeroed += [attn.o for attn in self.audio_injector.injector]
        if self.cond_encoder is not None:
            zeroed.append(self.cond_encoder)
        with torch.no_grad():
            for module in zeroed:
                for p in module.parameters():
                    p.zero_()

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    # ------------------------------------------------------------------------------------------------
    # Sizes the pipeline needs to lay out its cache

    def tokens_per_frame(self, latent_height: int, latent_width: int) -> int:
        """Tokens of one latent frame (1056 for a 48×88 latent, i.e. 384×704 video)."""
        height, width = self._token_grid(latent_height, latent_width)
        return height * width

    def sink_token_count(self, latent_height: int, latent_width: int) -> int:
        """Tokens in each layer's sink: reference frame plus motion tokens (2640 for a 48×88 latent)."""
        height, width = self._token_grid(latent_height, latent_width)
        return height * width + motion_token_count(height, width)

    def _token_grid(self, latent_height: int, latent_width: int) -> tuple[int, int]:
        # FramePack's 4× bucket patchifies 8×8 latent pixels, so the latent size must be a multiple of 8.
        if latent_height <= 0 or latent_width <= 0 or latent_height % 8 or latent_width % 8:
            raise ValueError(
                "latent size must be positive multiples of 8 (video multiples of 64), "
                f"got {latent_height}×{latent_width}"
            )
        _, ph, pw = self.config.patch_size
        return latent_height // ph, latent_width // pw

    # ------------------------------------------------------------------------------------------------
    # Conditioning encoders

    @torch.no_grad()
    def embed_text(self, t5_states: torch.Tensor) -> TextContext:
        """umT5 states [B, L, text_dim] (L ≤ text_len: the prompt's tokens, or already zero-padded) -> the run's
        context, states [B, text_len, dim] (its cross-attention K/V are computed once, on first use).

        Like the official code, the states are zero-padded to text_len *before* the embedding MLP and every
        one of the text_len positions stays visible to the cross-attention (there is no mask).
        """
        c = self.config
        if t5_states.ndim != 3 or t5_states.shape[-1] != c.text_dim:
            raise ValueError(f"t5_states must be [B, L, {c.text_dim}], got {tuple(t5_states.shape)}")
        if t5_states.shape[1] > c.text_len:
            raise ValueError(f"t5_states has {t5_states.shape[1]} tokens, more than text_len={c.text_len}")
        padded = F.pad(t5_states.to(self.dtype), (0, 0, 0, c.text_len - t5_states.shape[1]))
        return TextContext(self.text_embedding(padded))

    @torch.no_grad()
    def encode_audio(self, wav2vec_hidden_states: torch.Tensor) -> AudioTokens:
        """Audio tokens for the latent frames of one block (or any run of whole latent frames).

        wav2vec_hidden_states: [B, num_audio_hidden_states, audio_dim, AUDIO_LEFT_CONTEXT + 4·F] — all
        wav2vec2 hidden states, one column per 25-fps video frame: the 4·F video frames of the F latent frames
        (12 for a 3-frame block) preceded by AUDIO_LEFT_CONTEXT = 5 frames of left context.
        `block_audio_window(features, 12·k, 12)` builds it for block k the official way (the block's first
        frame repeated as context).

        Returns AudioTokens: tokens [B, F, num_audio_token + 1, dim] and global_token [B, F, 1, dim] in the
        model's dtype ([B, 3, 5, 5120] and [B, 3, 1, 5120] at 14B).
        """
        c = self.config
        shape = tuple(wav2vec_hidden_states.shape)
        if len(shape) != 4 or shape[1:3] != (c.num_audio_hidden_states, c.audio_dim):
            raise ValueError(
                f"wav2vec_hidden_states must be [B, {c.num_audio_hidden_states}, {c.audio_dim}, frames], "
                f"got {shape}"
            )
        frames = shape[3] - AUDIO_LEFT_CONTEXT
        if frames <= 0 or frames % VIDEO_FRAMES_PER_LATENT:
            raise ValueError(
                f"expected {AUDIO_LEFT_CONTEXT} context frames + a positive multiple of 4 video frames, "
                f"got {shape[3]}"
            )
        encoded = self.casual_audio_encoder(wav2vec_hidden_states)
        latent_frames = frames // VIDEO_FRAMES_PER_LATENT
        # The first outputs see the window's edge; the last latent_frames are exact (see audio_encoder).
        return AudioTokens(*(t[:, -latent_frames:].to(self.dtype) for t in encoded))

    # ------------------------------------------------------------------------------------------------
    # Timestep conditioning

    def _time_embedding(self, timesteps: torch.Tensor) -> torch.Tensor:
        """timesteps [B, F] -> embedding [B, F, dim] fp32."""
        features = sinusoidal_embedding(self.config.freq_dim, timesteps).float()
        return self.time_embedding(features).unflatten(0, timesteps.shape)

    def _modulation(self, time_embedding: torch.Tensor) -> torch.Tensor:
        """[B, F, dim] -> six adaLN vectors per frame [B, F, 6, dim] fp32 (before each block's own offset)."""
        return self.time_projection(time_embedding).unflatten(-1, (6, self.config.dim))

    def _frame_timesteps(self, timestep: float | torch.Tensor, batch: int, frames: int) -> torch.Tensor:
        if isinstance(timestep, torch.Tensor):
            t = timestep.to(device=self.device, dtype=torch.float64)
        else:
            # A fill on the device, not a copy from the host (which on CUDA waits for all queued work).
            t = torch.full((), float(timestep), dtype=torch.float64, device=self.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape == (batch,):
            t = t[:, None]
        if t.shape not in ((batch, 1), (batch, frames)):
            raise ValueError(
                f"timestep must be a scalar, [B] or [B, F] with B={batch}, F={frames}; got {tuple(t.shape)}"
            )
        return t.expand(batch, frames)

    # ------------------------------------------------------------------------------------------------
    # Streaming entry points

    @torch.no_grad()
    def prefill_sink(
        self,
        session: AttentionSession,
        ref_latent: torch.Tensor,
        motion_latents: torch.Tensor,
        context: TextContext,
    ) -> None:
        """Fill every layer's sink: one forward at timestep 0 over [reference-frame tokens; FramePack tokens].

        ref_latent: [B, in_dim, 1, h, w] VAE latent of the portrait; motion_latents: [B, in_dim, T, h, w]
        (oldest first; LiveAvatar encodes the portrait repeated 73× -> T = 19); context from `embed_text`. The
        latent size h×w must be a multiple of 8 (video a multiple of 64). As in the official code there is no
        audio injection in this pass, and the reference sits at temporal RoPE index 30, the motion tokens at
        negative indices. Each layer's sink receives its keys (normalised, without RoPE) and values.
        """
        c = self.config
        self._check_latents("ref_latent", ref_latent, frames=1)
        self._check_latents("motion_latents", motion_latents)
        if motion_latents.shape[0] != ref_latent.shape[0] or motion_latents.shape[3:] != ref_latent.shape[3:]:
            raise ValueError(
                f"motion_latents {tuple(motion_latents.shape)} must match "
                f"ref_latent {tuple(ref_latent.shape)} "
                "in batch and size"
            )
        batch = ref_latent.shape[0]
        height, width = self._token_grid(*ref_latent.shape[3:])
        context = self._check_context(context, batch)

        # 1. Sink tokens: the reference frame (id 1) then the motion tokens (id 2)
        ref = self.patch_embedding(ref_latent.to(self.dtype)).flatten(2).transpose(1, 2)  # [B, H·W, dim]
        motion = self.frame_packer(motion_latents.to(self.dtype))  # [B, N_motion, dim]
        mask = self.trainable_cond_mask.weight.to(self.dtype)
        x = torch.cat((ref + mask[REF_TOKEN], motion + mask[MOTION_TOKEN]), dim=1)  # [B, S, dim]

        # 2. All sink tokens take the zero-timestep modulation, as one group
        zero_t = torch.zeros(batch, 1, dtype=torch.float64, device=self.device)
        modulation = self._modulation(self._time_embedding(zero_t))  # [B, 1, 6, dim]

        # 3. Blocks: self-attention within the sink, storing each layer's K/V in the session
        positions = sink_positions(height, width, REF_BASE_TIME, self.device)
        attention = SinkPrefillAttention(session, rope_angles(positions, c.head_dim))
        for layer, block in enumerate(self.blocks):
            x = block(x, modulation, context, partial(attention, layer=layer))

    @torch.no_grad()
    def forward_block(
        self,
        session: AttentionSession,
        latents: torch.Tensor,
        timestep: float | torch.Tensor,
        context: TextContext,
        audio: AudioTokens,
        frame_index: int,
        ring: int,
        ref_shift: int,
    ) -> torch.Tensor:
        """Flow prediction for one block of noisy latents, attending to the sink and the block's history.

        Args:
            session: the run's ISPA `AttentionSession`; `prefill_sink` filled its sink at this video size.
            latents: [B, in_dim, F, h, w] noisy VAE latents of the block (F = 3 in LiveAvatar).
            timestep: the flow-matching timestep (0..1000) of this denoising step: scalar, [B] or [B, F].
            context: the run's `TextContext` from `embed_text` (states [B or 1, text_len, dim]).
            audio: `encode_audio` output for the same F latent frames.
            frame_index: absolute latent-frame index of the block's first frame (3·k for block k).
            ring: denoising step index; history K/V are kept per step, and each ring is used once per block.
            ref_shift: how far (in latent frames) the reference runs ahead of the block once the video is long
                enough: RoPE time 30 + max(0, frame_index − (30 − ref_shift)). LiveAvatar draws randint(4, 30)
                per forward; draw it from the run's own generator so that runs are reproducible.

        Returns:
            The flow prediction, same shape and dtype as `latents`.
        """
        c = self.config
        self._check_latents("latents", latents)
        batch, _, frames, latent_h, latent_w = latents.shape
        height, width = self._token_grid(latent_h, latent_w)
        context = self._check_context(context, batch)
        self._check_audio(audio, batch, frames)
        for name, value in (("frame_index", frame_index), ("ring", ring)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if not isinstance(ref_shift, int) or not 0 <= ref_shift <= MAX_REF_SHIFT:
            raise ValueError(f"ref_shift must be an integer in [0, {MAX_REF_SHIFT}], got {ref_shift!r}")

        # 1. Patchify: [B, F·H·W, dim], plus the zero-pose embedding and the noisy-token id
        x = self.patch_embedding(latents.to(self.dtype)).flatten(2).transpose(1, 2)
        if self.cond_encoder is not None:
            x = x + self.cond_encoder.bias.to(self.dtype)  # cond_encoder(all-zero pose latents) is its bias
        x = x + self.trainable_cond_mask.weight[NOISY_TOKEN].to(self.dtype)

        # 2. Timestep: per-frame adaLN vectors for the blocks, the embedding itself for the head
        time_embedding = self._time_embedding(self._frame_timesteps(timestep, batch, frames))  # [B, F, dim]
        modulation = self._modulation(time_embedding)  # [B, F, 6, dim]

        # 3. RoPE: the block at its absolute frames, the sink with the rolling reference
        query_positions = block_positions(frame_index, frames, height, width, self.device)
        sink = sink_positions(height, width, ref_time(frame_index, ref_shift), self.device)
        attention = StreamingAttention(
            session, ring, rope_angles(query_positions, c.head_dim), rope_angles(sink, c.head_dim)
        )

        # 4. Blocks, audio injected after the configured ones
        for layer, block in enumerate(self.blocks):
            x = block(x, modulation, context, partial(attention, layer=layer))
            if layer in self.injector_of_block:
                x = self.audio_injector(self.injector_of_block[layer], x, audio)

        # 5. Head and unpatchify: [B, F·H·W, p·out_dim] -> [B, out_dim, F, h, w]
        out = self.head(x, time_embedding)
        return self._unpatchify(out, frames, height, width).to(latents.dtype)

    # ------------------------------------------------------------------------------------------------
    # Helpers

    def _unpatchify(self, x: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        pt, ph, pw = self.config.patch_size
        out_dim = self.config.out_dim
        x = x.view(x.shape[0], frames, height, width, pt, ph, pw, out_dim)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, F, pt, H, ph, W, pw]
        return x.reshape(x.shape[0], out_dim, frames * pt, height * ph, width * pw)

    def _check_latents(self, name: str, latents: torch.Tensor, frames: int | None = None) -> None:
        if latents.ndim != 5 or latents.shape[1] != self.config.in_dim or latents.shape[2] < 1:
            raise ValueError(f"{name} must be [B, {self.config.in_dim}, F, h, w], got {tuple(latents.shape)}")
        if frames is not None and latents.shape[2] != frames:
            raise ValueError(f"{name} must have {frames} latent frame(s), got {latents.shape[2]}")

    def _check_context(self, context: TextContext, batch: int) -> TextContext:
        if not isinstance(context, TextContext):
            raise ValueError(
                f"context must be the TextContext embed_text returns, got {type(context).__name__}"
            )
        states, expected = context.states, (self.config.text_len, self.config.dim)
        if states.ndim != 3 or tuple(states.shape[1:]) != expected or states.shape[0] not in (1, batch):
            raise ValueError(
                f"context states must be [B or 1, {expected[0]}, {expected[1]}], got {tuple(states.shape)}"
            )
        if states.dtype != self.dtype:
            raise ValueError(f"context states must be in the model's dtype {self.dtype}, got {states.dtype}")
        return context

    def _check_audio(self, audio: AudioTokens, batch: int, frames: int) -> None:
        c = self.config
        expected = ((batch, frames, c.num_audio_token + 1, c.dim), (batch, frames, 1, c.dim))
        got = (tuple(audio.tokens.shape), tuple(audio.global_token.shape))
        if got != expected:
            raise ValueError(
                f"audio tokens/global_token must be {expected[0]} / {expected[1]}, got {got[0]} / {got[1]}"
            )
