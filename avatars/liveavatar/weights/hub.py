"""Where LiveAvatar's weights come from (`fetch` downloads them), and checking a folder holds all of them.

Three Hugging Face repositories, each downloaded (only the files we use) into `<root>/<repo name>/` with the repo's
own layout, so a folder prepared by hand with `huggingface-cli download <repo> --local-dir <root>/<repo name>` is
used as is and needs no network:

* `Wan-AI/Wan2.2-S2V-14B`: the DiT (`config.json`, `diffusion_pytorch_model-0000{1..4}-of-00004.safetensors` and
  their index) and `wav2vec2-large-xlsr-53-english/`. Its `.pth` text encoder and VAE are skipped.
* `Quark-Vision/Live-Avatar`: `liveavatar.safetensors`, the rank-128 LoRA.
* `Wan-AI/Wan2.1-T2V-1.3B-Diffusers`: `text_encoder/` (transformers `UMT5EncoderModel`, umT5-XXL encoder, five
  fp32 shards ≈ 22.7 GB), `tokenizer/` and `vae/` (diffusers `AutoencoderKLWan`, the same Wan2.1 VAE). Chosen
  because transformers and diffusers load these folders directly, where the S2V repo's `.pth` files would need
  the official model code.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from avatars.liveavatar.weights.errors import CheckpointError

logger = logging.getLogger(__name__)

WAV2VEC2_FOLDER = "wav2vec2-large-xlsr-53-english"
LORA_FILE = "liveavatar.safetensors"


@dataclass(frozen=True)
class WeightSource:
    """One Hub repository and the files of it we download."""

    repo_id: str
    allow_patterns: tuple[str, ...]

    @property
    def folder_name(self) -> str:
        return self.repo_id.split("/")[-1]


S2V_BASE = WeightSource(
    "Wan-AI/Wan2.2-S2V-14B",
    (
        "config.json",
        "diffusion_pytorch_model-*-of-*.safetensors",
        "diffusion_pytorch_model.safetensors.index.json",
        f"{WAV2VEC2_FOLDER}/*.json",
        f"{WAV2VEC2_FOLDER}/*.safetensors",
        f"{WAV2VEC2_FOLDER}/*.bin",
    ),
)
LIVEAVATAR_LORA = WeightSource("Quark-Vision/Live-Avatar", (LORA_FILE,))
WAN_DIFFUSERS = WeightSource(
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    ("text_encoder/*", "tokenizer/*", "vae/*"),
)
SOURCES = (S2V_BASE, LIVEAVATAR_LORA, WAN_DIFFUSERS)


@dataclass(frozen=True)
class WeightPaths:
    """Resolved locations of every weight folder and file the LiveAvatar backend loads."""

    dit_dir: Path
    wav2vec2_dir: Path
    lora_file: Path
    text_encoder_dir: Path
    tokenizer_dir: Path
    vae_dir: Path

    @classmethod
    def under(cls, root: str | Path) -> WeightPaths:
        """The paths in the `<root>/<repo name>/` layout."""
        root = Path(root)
        base, diffusers = root / S2V_BASE.folder_name, root / WAN_DIFFUSERS.folder_name
        return cls(
            dit_dir=base,
            wav2vec2_dir=base / WAV2VEC2_FOLDER,
            lora_file=root / LIVEAVATAR_LORA.folder_name / LORA_FILE,
            text_encoder_dir=diffusers / "text_encoder",
            tokenizer_dir=diffusers / "tokenizer",
            vae_dir=diffusers / "vae",
        )


def _safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file, or None.

    Cheap: the safetensors library reads and validates the header (offsets, dtypes, shapes, and that the data covers
    the file exactly) without reading the tensors."""
    try:
        with safe_open(path, framework="pt"):
            return None
    except SafetensorError as err:
        size, described = path.stat().st_size, _size_in_header(path)
        if described is not None and described > size:
            return f"truncated ({size} bytes, the header describes {described})"
        return f"not a safetensors file ({err})"


def _size_in_header(path: Path) -> int | None:
    """The file size a safetensors header announces, or None without a readable header.

    Read by hand: the library refuses a file that is not fully present, and only the header says how much is missing.
    """
    with path.open("rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little")
        if len(head) < 8 or header_len > 100_000_000:
            return None
        try:  # ValueError covers bad JSON and bad UTF-8
            header = json.loads(f.read(header_len))
            tensors = [v for k, v in header.items() if k != "__metadata__"]
            return 8 + header_len + max((int(v["data_offsets"][1]) for v in tensors), default=0)
        except (ValueError, AttributeError, KeyError, IndexError, TypeError):
            return None


def _check_weights(folder: Path, stem: str, missing: list[str], damaged: list[str]) -> None:
    """A folder's `<stem>.safetensors`, or its sharded form (index + every shard it names)."""
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            damaged.append(f"{index} (not a safetensors index)")
            return
        files = [folder / shard for shard in shards]
    else:
        missing.append(str(index))
        return
    for file in files:
        if not file.is_file():
            missing.append(str(file))
        elif (problem := _safetensors_problem(file)) is not None:
            damaged.append(f"{file} ({problem})")


def check_weights(paths: WeightPaths) -> None:
    """Raise CheckpointError listing every missing or damaged file; return quietly when all are usable."""
    missing: list[str] = []
    damaged: list[str] = []
    required = [
        paths.dit_dir / "config.json",
        paths.wav2vec2_dir / "config.json",
        paths.wav2vec2_dir / "preprocessor_config.json",
        paths.text_encoder_dir / "config.json",
        paths.vae_dir / "config.json",
    ]
    missing += [str(p) for p in required if not p.is_file()]
    _check_weights(paths.dit_dir, "diffusion_pytorch_model", missing, damaged)
    _check_weights(paths.text_encoder_dir, "model", missing, damaged)
    _check_weights(paths.vae_dir, "diffusion_pytorch_model", missing, damaged)
    wav2vec2_weights = [paths.wav2vec2_dir / "model.safetensors", paths.wav2vec2_dir / "pytorch_model.bin"]
    if not any(p.is_file() for p in wav2vec2_weights):
        missing.append(f"{wav2vec2_weights[0]} (or pytorch_model.bin)")
    if not paths.lora_file.is_file():
        missing.append(str(paths.lora_file))
    elif (problem := _safetensors_problem(paths.lora_file)) is not None:
        damaged.append(f"{paths.lora_file} ({problem})")
    has_tokenizer = any((paths.tokenizer_dir / name).is_file() for name in ("tokenizer.json", "spiece.model"))
    if not has_tokenizer:
        missing.append(f"{paths.tokenizer_dir / 'tokenizer.json'} (or spiece.model)")
    if missing or damaged:
        lines = [f"  missing: {m}" for m in missing] + [f"  damaged: {d}" for d in damaged]
        raise CheckpointError("LiveAvatar weights are incomplete; download them again:\n" + "\n".join(lines))


def resolve_weights(root: str | Path) -> WeightPaths:
    """The weight paths under a local `root` (downloaded or prepared by hand); no network."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"weights folder not found: {root}")
    paths = WeightPaths.under(root)
    check_weights(paths)
    return paths
