"""Tiny checkpoints written in exactly the official layouts, so the real loading code runs on CPU without downloads.

`write_tiny_weights(root)` fills `<root>` the way `hub.download_weights` does: the sharded DiT with its index and
`config.json`, the wav2vec2 folder, the LoRA file with PEFT key names, and the diffusers `text_encoder/`
(sharded, with index), `tokenizer/` and `vae/` folders. Tests and the app's offline demo both use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from avatars.liveavatar.config import PRESETS, DiTConfig
from avatars.liveavatar.dit import LiveAvatarDiT
from avatars.liveavatar.encoders.tiny import tiny_tokenizer, tiny_umt5, tiny_vae, tiny_wav2vec2
from avatars.liveavatar.weights.dit_loader import CONFIG_NAME, INDEX_NAME
from avatars.liveavatar.weights.hub import WeightPaths
from avatars.liveavatar.weights.lora import lora_target_modules

TINY_LORA_RANK = 8


@dataclass(frozen=True)
class TinyCheckpoint:
    """What `write_tiny_weights` wrote, for tests to compare against what loads back."""

    paths: WeightPaths
    dit_state: dict[str, torch.Tensor]  # as stored (bf16 unless asked otherwise)
    lora_factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [r, in], B [out, r])


def _random_dit_state(config: DiTConfig, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's own initialisation, with zero-initialised tensors replaced by small random values.

    Zero tensors would make the audio injection a no-op and let a loader that drops them go unnoticed.
    """
    torch.manual_seed(seed)
    model = LiveAvatarDiT.from_config(config)
    state = {}
    for name, tensor in model.state_dict().items():
        if not torch.any(tensor):
            tensor = 0.02 * torch.randn(tensor.shape)
        state[name] = tensor.to(dtype).contiguous()
    return state


def write_dit_checkpoint(
    directory: str | Path,
    config: DiTConfig = PRESETS["tiny"],
    *,
    num_shards: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """`config.json` + `diffusion_pytorch_model-0000i-of-0000n.safetensors` + index, as in the S2V repo."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = _random_dit_state(config, seed, dtype)
    names = list(state)
    shard_names = [
        f"diffusion_pytorch_model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)
    ]
    weight_map = {}
    for i, shard in enumerate(shard_names):
        part = names[i * len(names) // num_shards : (i + 1) * len(names) // num_shards]
        save_file({name: state[name] for name in part}, str(directory / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2))
    (directory / CONFIG_NAME).write_text(
        json.dumps({"_class_name": "WanModel_S2V", **config.to_dict()}, indent=2)
    )
    return state


def write_lora(
    path: str | Path,
    config: DiTConfig = PRESETS["tiny"],
    *,
    rank: int = TINY_LORA_RANK,
    seed: int = 1,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A LoRA for every official target module, keys `<module>.lora_A.default.weight` / `lora_B`."""
    with torch.device("meta"):
        targets = lora_target_modules(LiveAvatarDiT.from_config(config))
    generator = torch.Generator().manual_seed(seed)
    factors, tensors = {}, {}
    for module, (out_features, in_features) in targets.items():
        down = (torch.randn(rank, in_features, generator=generator) / in_features**0.5).to(dtype)
        up = (0.1 * torch.randn(out_features, rank, generator=generator)).to(dtype)
        factors[module] = (down, up)
        tensors[f"{module}.lora_A.default.weight"] = down
        tensors[f"{module}.lora_B.default.weight"] = up
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return factors


def write_wav2vec2(directory: str | Path, seed: int = 0) -> None:
    """The `wav2vec2-large-xlsr-53-english/` layout: a CTC model and its feature extractor, saved by transformers."""
    model, extractor = tiny_wav2vec2(seed)
    model.save_pretrained(str(directory))
    extractor.save_pretrained(str(directory))


def write_text_encoder(text_encoder_dir: str | Path, tokenizer_dir: str | Path, seed: int = 0) -> None:
    """The diffusers `text_encoder/` (sharded with an index, like the real five shards) and `tokenizer/` folders."""
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(str(tokenizer_dir))
    tiny_umt5(len(tokenizer), seed).save_pretrained(str(text_encoder_dir), max_shard_size="40KB")


def write_vae(directory: str | Path, seed: int = 0) -> None:
    """The diffusers `vae/` folder (config.json + diffusion_pytorch_model.safetensors)."""
    tiny_vae(seed).save_pretrained(str(directory))


def write_tiny_weights(
    root: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> TinyCheckpoint:
    """Every tiny checkpoint under `root` in the `<root>/<repo name>/` layout the hub module resolves."""
    paths = WeightPaths.under(root)
    dit_state = write_dit_checkpoint(paths.dit_dir, seed=seed, dtype=dtype)
    lora = write_lora(paths.lora_file, seed=seed + 1, dtype=dtype)
    write_wav2vec2(paths.wav2vec2_dir, seed)
    write_text_encoder(paths.text_encoder_dir, paths.tokenizer_dir, seed)
    write_vae(paths.vae_dir, seed)
    return TinyCheckpoint(paths=paths, dit_state=dit_state, lora_factors=lora)
