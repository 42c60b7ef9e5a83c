"""The Wan2.1 VAE (diffusers `AutoencoderKLWan`): portrait latents in, streamed video frames out.

Encoding follows the official single-GPU pipeline (`causal_s2v_pipeline.py`): the portrait, as a [-1, 1] tensor,
is repeated 5 frames and encoded, and latent frame 1 is kept (frame 0 of a causal encode sees only the first
image). The motion context is that 5-frame reference repeated `motion_frames` (73) times, a still video of 365
frames → 92 latent frames, of which FramePack reads the last 19. (The 5-GPU pipeline instead encodes 73 frames and
a 1-frame reference; this module does not follow it.) Latents are the posterior mean, normalised as
`(mu - latents_mean) / latents_std`.

Decoding streams: the decoder's causal 3-D convolutions keep a cache of their last input frames, and diffusers'
own `decode` already walks the latent frames one by one through that cache. `StreamingDecoder` keeps the cache
between calls, so a block of 3 latent frames becomes video as soon as it is denoised (9 frames for the first block,
whose first latent frame decodes to one image, then 12) and the concatenated blocks equal one `decode` call.
The decoder's full-resolution stages take one output frame at a time (`vae_frames`), which cuts the decode's
transient memory about fourfold and leaves the video as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

from avatars.liveavatar.encoders.vae_frames import decode_latent_frame
from avatars.media.portrait import check_rgb_image

REFERENCE_REPEAT = 5  # frames the portrait is repeated for its reference latent
MOTION_FRAMES = 73  # the official `motion_frames`: FramePack reads (73 + 3) // 4 = 19 latent frames
# The single-GPU pipeline repeats the already 5-frame reference 73 times: 365 frames, 92 latent frames.
MOTION_VIDEO_FRAMES = REFERENCE_REPEAT * MOTION_FRAMES
MOTION_LATENT_FRAMES = (MOTION_FRAMES + 3) // 4  # 19
FRAMES_PER_PASS = 1  # output frames per pass through the decoder's full-resolution stages (`vae_frames`)


def portrait_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 RGB [H, W, 3] → float32 [1, 3, 1, H, W] in [-1, 1] (a one-frame video)."""
    check_rgb_image(image)
    pixels = torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255.0
    return (pixels * 2.0 - 1.0)[None, :, None]


class WanVAE:
    """The VAE with LiveAvatar's latent normalisation; `vae` is any `AutoencoderKLWan` (real or tiny)."""

    def __init__(self, vae: AutoencoderKLWan) -> None:
        self.vae = vae.eval().requires_grad_(False)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        self.latents_mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(shape)
        # Kept as the reciprocal, like the official `scale[1]`, so normalising is the same multiplication.
        self.inv_latents_std = 1.0 / torch.tensor(vae.config.latents_std, dtype=torch.float32).view(shape)

    @classmethod
    def from_pretrained(
        cls, vae_dir: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> WanVAE:
        """Load the diffusers `vae/` folder (config.json + diffusion_pytorch_model.safetensors)."""
        return cls(AutoencoderKLWan.from_pretrained(str(vae_dir), torch_dtype=dtype).to(device))

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _check_size(self, height: int, width: int) -> None:
        ratio = self.vae.spatial_compression_ratio
        if height % ratio or width % ratio:
            raise ValueError(f"video size {height}×{width} must be a multiple of {ratio} in both directions")

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, z, 1 + (T-1)//4, H/8, W/8] of a [-1, 1] video [B, 3, T, H, W]."""
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, T, H, W], got {tuple(video.shape)}")
        self._check_size(video.shape[-2], video.shape[-1])
        mu = self.vae.encode(video.to(device=self.device, dtype=self.dtype)).latent_dist.mode()
        return (mu.float() - self.latents_mean.to(mu.device)) * self.inv_latents_std.to(mu.device)

    def encode_reference(self, portrait: np.ndarray) -> torch.Tensor:
        """The reference latent [1, z, 1, h, w]: portrait repeated 5 frames, latent frame 1 kept."""
        return self.encode(portrait_to_tensor(portrait).repeat(1, 1, REFERENCE_REPEAT, 1, 1))[:, :, 1:]

    def encode_motion(self, portrait: np.ndarray, motion_frames: int = MOTION_VIDEO_FRAMES) -> torch.Tensor:
        """Motion-context latents [1, z, (motion_frames+3)//4, h, w] of a still video of the portrait.

        The default is the single-GPU pipeline's 365 frames (92 latents); the DiT's FramePack keeps the last 19.
        """
        if motion_frames < 1 or motion_frames % 4 != 1:
            raise ValueError(f"motion_frames must be 1 more than a multiple of 4, got {motion_frames}")
        return self.encode(portrait_to_tensor(portrait).repeat(1, 1, motion_frames, 1, 1))

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents back to the VAE's own latent space, in the VAE's dtype."""
        mean, inv_std = self.latents_mean.to(latents.device), self.inv_latents_std.to(latents.device)
        return (latents.float() / inv_std + mean).to(self.dtype)

    def stream_decoder(self, frames_per_pass: int | None = FRAMES_PER_PASS) -> StreamingDecoder:
        """A fresh decoder whose first block is the start of a video; `frames_per_pass`: see `StreamingDecoder`."""
        return StreamingDecoder(self, frames_per_pass)


class StreamingDecoder:
    """Decodes consecutive latent blocks of one video, keeping the causal-conv cache between blocks.

    The cache is held here, not on the diffusers module, so several decoders can share one VAE.
    `frames_per_pass`: output frames per pass through the full-resolution stages (`vae_frames`); None decodes
    each latent frame's frames at once, as diffusers does (about 4× the transient memory, the same video).
    """

    def __init__(self, vae: WanVAE, frames_per_pass: int | None = FRAMES_PER_PASS) -> None:
        if frames_per_pass is not None and (not isinstance(frames_per_pass, int) or frames_per_pass < 1):
            raise ValueError(f"frames_per_pass must be a positive integer or None, got {frames_per_pass!r}")
        self._vae = vae
        self.frames_per_pass = frames_per_pass
        num_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.vae.decoder.modules())
        self._cache: list = [None] * num_convs
        self.latent_frames_done = 0

    @torch.no_grad()
    def decode_block(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode the next latent frames [B, z, t, h, w] → [B, 3, frames, 8h, 8w] in [-1, 1].

        frames = 4t, minus 3 when this block starts the video (its first latent frame is one image).
        """
        if latents.dim() != 5 or latents.shape[1] != self._vae.vae.config.z_dim or latents.shape[2] == 0:
            raise ValueError(
                f"latents must be [B, {self._vae.vae.config.z_dim}, t>0, h, w], got {tuple(latents.shape)}"
            )
        vae = self._vae.vae
        x = vae.post_quant_conv(self._vae.denormalize(latents.to(self._vae.device)))
        frames = []
        for i in range(x.shape[2]):
            frames.append(
                decode_latent_frame(
                    vae.decoder,
                    x[:, :, i : i + 1],
                    self._cache,
                    self.frames_per_pass,
                    first_chunk=self.latent_frames_done == 0,
                )
            )
            self.latent_frames_done += 1
        return torch.cat(frames, dim=2).clamp(-1.0, 1.0)

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """Tell the CUDA caching allocator that the cache's tensors are now used on `stream`.

        The cache as it stands (the warm-up's, or a restored state's) was made on another stream; decodes on
        `stream` read it and free it as they replace it, and without this the allocator could hand its memory to
        the stream that made it (the DiT's) while `stream` still reads it.
        """
        for entry in self._cache:
            if isinstance(entry, torch.Tensor):
                entry.record_stream(stream)

    def snapshot(self, device: torch.device | None = None) -> DecoderState:
        """A copy of where this decoder stands (its causal cache and frame count), for `restore` on another;
        on `device` (default: where the cache is), copied there directly."""
        return DecoderState(self._cache, self.latent_frames_done).copy_to(device)

    def restore(self, state: DecoderState) -> None:
        """Continue from `state` as if this decoder had decoded what the snapshot's decoder had (state is taken
        over, not copied: restore each snapshot once)."""
        if len(state.cache) != len(self._cache):
            raise ValueError(
                f"the state has {len(state.cache)} cache entries, this decoder {len(self._cache)}"
            )
        self._cache = list(state.cache)
        self.latent_frames_done = state.latent_frames_done


@dataclass
class DecoderState:
    """A `StreamingDecoder`'s causal cache and the latent frames it has decoded, detached from any decoder."""

    cache: list
    latent_frames_done: int

    def copy_to(self, device: torch.device | str | None = None) -> DecoderState:
        """A copy with every tensor on `device` (None: where each is), sharing no memory with this one."""
        cache = [
            t.to(device or t.device, copy=True) if isinstance(t, torch.Tensor) else t for t in self.cache
        ]
        return DecoderState(cache, self.latent_frames_done)
