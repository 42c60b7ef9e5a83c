"""Switch a variant's levers on around its runs, and off again after (`bench/suite/variants.py` names them).

A lever either changes the request (the step count), flips an engine switch for the variant's runs, or moves the
VAE to a second GPU; either way the next variant starts from the settings it would have had without this one.
`decode-gpu1` is the one-process form of the rank pipeline's 2-process layout (one DiT rank, a decoder rank): the
same `DecoderStage` decodes each block on cuda:1 while the DiT runs the next on cuda:0, with the latents copied
across (the frames come back to the host either way). A machine without a second GPU skips it (`LeverUnavailable`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch

from bench.suite.variants import Variant


class LeverUnavailable(RuntimeError):
    """A lever this machine cannot run (the variant is skipped, with this as its reason)."""


def check_available(variant: Variant, gpus: int) -> None:
    """LeverUnavailable when `variant` needs what a machine with `gpus` CUDA devices lacks."""
    if "decode-gpu1" in variant.levers and gpus < 2:
        raise LeverUnavailable(f"decode-gpu1 needs a second GPU; this machine has {gpus}")


@contextmanager
def levers_on(pipe: Any, request: Any, variant: Variant) -> Iterator[Any]:
    """The request the variant's runs take, with every one of its levers on until the block exits."""
    from avatars.liveavatar.fp8_linear import fused_quantization, set_fused_quantization

    if "decode-gpu1" in variant.levers:
        with vae_on(pipe, torch.device("cuda", 1)):
            rest = tuple(lever for lever in variant.levers if lever != "decode-gpu1")
            with levers_on(pipe, request, replace(variant, levers=rest)) as moved:
                yield moved
        return
    saved = pipe.statistics_precision, pipe.fused_merge, fused_quantization()
    if "stats-bf16" in variant.levers:
        pipe.statistics_precision = "bf16"
    pipe.fused_merge = "merge-fused" in variant.levers or pipe.fused_merge
    if "quant-fused" in variant.levers:
        set_fused_quantization(True)
    try:
        yield replace(request, steps=variant.steps)
    finally:
        pipe.statistics_precision, pipe.fused_merge = saved[:2]
        set_fused_quantization(saved[2])


@contextmanager
def vae_on(pipe: Any, device: torch.device) -> Iterator[None]:
    """The pipeline's VAE on `device` until the block exits (its portrait latents, encoded there, are dropped)."""
    from avatars.liveavatar.portrait_latents import PortraitLatentCache

    home = pipe.vae.device
    pipe.vae.vae.to(device)
    pipe.portrait_latents = PortraitLatentCache(pipe.vae)
    try:
        yield
    finally:
        pipe.vae.vae.to(home)
        pipe.portrait_latents = PortraitLatentCache(pipe.vae)
