"""Building a ready pipeline: the tiny untrained test model, or LiveAvatar 14B from its real weights.

The one entry point for everything that needs a loaded pipeline (the app, the CLI, the benchmarks): which models
can run here (`available_models`), and `load_pipeline(name)`; `load_parts` for a rank of the several-GPU pipeline
that runs only the DiT or the VAE.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from huggingface_hub import constants

from avatars.liveavatar.compiled import COMPILE_ENV, set_compiled_dit, set_compiled_regions
from avatars.liveavatar.config import PRESETS
from avatars.liveavatar.dit import LiveAvatarDiT
from avatars.liveavatar.encoders.audio import AudioEncoder
from avatars.liveavatar.encoders.text import TextEncoder
from avatars.liveavatar.encoders.tiny import tiny_tokenizer, tiny_umt5, tiny_vae, tiny_wav2vec2
from avatars.liveavatar.encoders.vae import WanVAE
from avatars.liveavatar.memory_plan import check_fits_free_memory, lightest_plan
from avatars.liveavatar.pipeline import LiveAvatarPipeline
from avatars.liveavatar.sizing import LIVEAVATAR_SIZES, SIZE_DIVISOR, TINY_SIZES
from avatars.liveavatar.weights.dit_loader import load_dit
from avatars.liveavatar.weights.errors import CheckpointError
from avatars.liveavatar.weights.fp8 import convert_linears_to_fp8
from avatars.liveavatar.weights.hub import WeightPaths, resolve_weights

logger = logging.getLogger(__name__)

MODEL_NAMES = ("tiny", "14b")
WEIGHTS_ENV = "ISPA_WEIGHTS"  # where `python -m avatars.liveavatar.download` put the weights
DEFAULT_WEIGHTS_DIR = Path("weights")
DOWNLOAD_ENV = "ISPA_DOWNLOAD"  # "1": the app fetches missing weights in the background (always on a Space)
PERSISTENT_STORAGE = Path("/data")  # a Space's persistent storage, when it has some
TINY_LABEL = "tiny untrained test model (random weights): shows the engine working, not a real face"
LIVEAVATAR_LABEL = "LiveAvatar (Wan2.2-S2V-14B + LiveAvatar LoRA)"


def weights_dir() -> Path:
    """$ISPA_WEIGHTS; else, where weights are fetched on start (`downloads_on_start`), `download_home()`;
    else ./weights."""
    if WEIGHTS_ENV in os.environ:
        return Path(os.environ[WEIGHTS_ENV])
    return download_home() if downloads_on_start() else DEFAULT_WEIGHTS_DIR


def downloads_on_start() -> bool:
    """Whether the app should fetch missing weights itself: on a Hugging Face Space, or with ISPA_DOWNLOAD=1."""
    return bool(os.environ.get("SPACE_ID")) or os.environ.get(DOWNLOAD_ENV, "") == "1"


def download_home(persistent: Path = PERSISTENT_STORAGE) -> Path:
    """Persistent storage (`/data`) when it is there and writable, else the Hugging Face cache folder (HF_HOME),
    which a Space without persistent storage loses on restart."""
    if persistent.is_dir() and os.access(persistent, os.W_OK):
        return persistent / "ispa-weights"
    return Path(constants.HF_HOME) / "ispa-weights"


def available_models(gpu: bool | None = None) -> dict[str, str | None]:
    """Each model name → None when it can run here, else the reason it cannot (for the UI to show).

    `gpu` says whether a GPU is present (asked of torch when None)."""
    reasons: dict[str, str | None] = {"tiny": None}
    if not (torch.cuda.is_available() if gpu is None else gpu):
        reasons["14b"] = "needs an NVIDIA GPU (none found); the tiny test model runs instead"
    else:
        try:
            resolve_weights(weights_dir())
            reasons["14b"] = None
        except CheckpointError as err:
            reasons["14b"] = (
                f"weights not found in {weights_dir()} ({str(err).splitlines()[0]}); "
                "download them with `python -m avatars.liveavatar.download`"
            )
    return reasons


def build_tiny_pipeline(seed: int = 0) -> LiveAvatarPipeline:
    """The real classes at the tiny preset with seeded random weights, on CPU in fp32.

    Zero-initialised tensors (the audio injector's output, adaLN) get small random values so that every input
    — audio, history, prompt — visibly changes the output.
    """
    config = PRESETS["tiny"]
    torch.manual_seed(seed)
    dit = LiveAvatarDiT.from_config(config)
    with torch.no_grad():
        for tensor in dit.state_dict().values():
            if tensor.is_floating_point() and not torch.any(tensor):
                tensor.normal_(std=0.02)
    dit.eval()
    wav2vec2, extractor = tiny_wav2vec2(seed)
    tokenizer = tiny_tokenizer()
    text = TextEncoder(tiny_umt5(len(tokenizer), seed), tokenizer, text_len=config.text_len)
    return LiveAvatarPipeline(
        dit,
        AudioEncoder(wav2vec2, extractor),
        text,
        WanVAE(tiny_vae(seed)),
        label=TINY_LABEL,
        is_test_model=True,
        size_divisor=SIZE_DIVISOR,
        sizes=TINY_SIZES,
        model="tiny",
    )


def build_liveavatar_pipeline(
    paths: WeightPaths,
    *,
    device: torch.device | str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    fp8: bool = False,
    offload_text_encoder: bool = True,
    audio_fp32: bool = False,
) -> LiveAvatarPipeline:
    """LiveAvatar 14B from local weights: DiT with the LoRA merged (then FP8 if asked), wav2vec2 (bf16 as the
    official pipeline runs it, fp32 with `audio_fp32`), umT5, VAE.

    Checks first that the GPU has room for the lightest run of the smallest size (`memory_plan.lightest_plan`), so
    a too-small GPU fails with a clear message before 40 GB are read from disk.
    """
    device = torch.device(device)
    if device.type == "cuda":
        plan = lightest_plan(
            weights="fp8" if fp8 else "bf16",
            text_encoder_on_gpu=not offload_text_encoder,
            audio_fp32=audio_fp32,
        )
        free, _ = torch.cuda.mem_get_info(device)
        check_fits_free_memory(plan, free, torch.cuda.get_device_name(device))
    logger.info("loading LiveAvatar 14B (%s weights) on %s", "FP8" if fp8 else "bf16", device)
    dit = _load_liveavatar_dit(paths, fp8=fp8, device=device, dtype=dtype)
    text = TextEncoder.from_pretrained(
        paths.text_encoder_dir,
        paths.tokenizer_dir,
        text_len=dit.config.text_len,
        dtype=dtype,
        device=device,
        offload=offload_text_encoder,
    )
    return LiveAvatarPipeline(
        dit,
        AudioEncoder.from_pretrained(
            paths.wav2vec2_dir, dtype=torch.float32 if audio_fp32 else torch.bfloat16, device=device
        ),
        text,
        WanVAE.from_pretrained(paths.vae_dir, dtype=dtype, device=device),
        label=LIVEAVATAR_LABEL,
        is_test_model=False,
        size_divisor=SIZE_DIVISOR,
        sizes=LIVEAVATAR_SIZES,
        model="14b",
        weights="fp8" if fp8 else "bf16",
    )


def load_pipeline(
    name: str,
    *,
    fp8: bool = False,
    device: torch.device | str = "cuda",
    audio_fp32: bool = False,
    compile_regions: bool | None = None,
) -> LiveAvatarPipeline:
    """'tiny' (always on the CPU, no download) or '14b' (on the CUDA `device`, weights under $ISPA_WEIGHTS or
    ./weights). `audio_fp32`: the 14B's wav2vec2 in fp32 instead of the official bf16 (the tiny one is fp32).

    `compile_regions`: compile the DiT's pointwise regions (`avatars.liveavatar.compiled`); None: as ISPA_COMPILE=1 in
    the environment says.
    """
    if name == "tiny":
        pipeline = build_tiny_pipeline()
    elif name == "14b":
        pipeline = build_liveavatar_pipeline(
            _liveavatar_weights(), fp8=fp8, device=device, audio_fp32=audio_fp32
        )
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if _compile_asked() if compile_regions is None else compile_regions:
        set_compiled_regions(pipeline)
    return pipeline


def load_parts(
    name: str, *, fp8: bool, device: torch.device, dit: bool, vae: bool
) -> tuple[LiveAvatarDiT | None, WanVAE | None]:
    """Only the DiT and/or the VAE of `name`, for a pipeline rank that runs no encoder. The tiny model is built
    whole (it costs nothing) and stays on the CPU; ISPA_COMPILE=1 compiles the DiT's regions as `load_pipeline`."""
    if name == "tiny":
        tiny = build_tiny_pipeline()
        parts = (tiny.dit if dit else None, tiny.vae if vae else None)
    elif name == "14b":
        paths = _liveavatar_weights()
        logger.info(
            "loading LiveAvatar 14B's %s on %s",
            " and ".join(p for p, w in (("DiT", dit), ("VAE", vae)) if w),
            device,
        )
        parts = (
            _load_liveavatar_dit(paths, fp8=fp8, device=device, dtype=torch.bfloat16) if dit else None,
            WanVAE.from_pretrained(paths.vae_dir, dtype=torch.bfloat16, device=device) if vae else None,
        )
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if parts[0] is not None and _compile_asked():
        set_compiled_dit(parts[0])
    return parts


def _liveavatar_weights() -> WeightPaths:
    """The 14B weights' paths; a RuntimeError saying why when the model cannot run here."""
    reason = available_models()["14b"]
    if reason is not None:
        raise RuntimeError(f"LiveAvatar 14B cannot run here: {reason}")
    return resolve_weights(weights_dir())


def _compile_asked() -> bool:
    return os.environ.get(COMPILE_ENV, "") == "1"


def _load_liveavatar_dit(
    paths: WeightPaths, *, fp8: bool, device: torch.device, dtype: torch.dtype
) -> LiveAvatarDiT:
    """The DiT with the LoRA merged, then FP8 if asked."""
    dit = load_dit(paths.dit_dir, lora_path=paths.lora_file, dtype=dtype, device=device)
    if fp8:
        convert_linears_to_fp8(dit)
    return dit
