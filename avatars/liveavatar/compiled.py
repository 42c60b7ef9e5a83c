"""Regional `torch.compile` of the streaming loop: the pointwise-heavy code of the DiT around the ISPA engine call.

Why regions and not the whole forward: the session (`ispa.AttentionSession`) is Python that changes shapes from block
to block (history 0..3 blocks, then the F/L switch at the absorb) and keeps its own state, so a whole-forward graph
would break or recompile at every change. Around it, the work is shape-static: per block and layer,
- `TransformerBlock.attention_input`: LayerNorm and the adaLN modulation in fp32, cast;
- `SelfAttention.project_local`: q/k/v, the q/k RMSNorms, RoPE of q, k and the sink keys, written into the session's
  local buffers;
- `TransformerBlock.after_attention`: gate and residual, cross-attention to the cached text K/V, the gated FFN;
- after the audio-injected blocks, the injector's AdaLN and its cross-attention to the frame's audio tokens;
while the engine call between them (attention, LSE merge, statistics, output projection) stays eager. The audit of
2026-12-01 counts these eager pointwise ops at ≈ 28 % of a bf16 14B forward (an estimate; not measured).

How: each region is a method; compiling binds one compiled function per region onto every block's instance (the
class keeps the eager method). Dynamo caches per code object and treats module parameters as inputs, so the 40
blocks share one graph per region instead of compiling 40. The sink prefill (once per run, other shapes) runs
eager. `set_compiled_regions(pipeline, False)` restores the eager methods.

The VAE decode is not compiled (yet). Tried on CPU (2026-12-02): its RMS norms compiled with dynamic shapes met a
new size or stride guard at most call sites of a block (the decoder's resolutions, the causal cache's slices), hit
dynamo's recompile limit of 8 and ran eager from there; that first block took 207 s on a loaded 2-core CPU. Compiling
it properly needs the causal-cache bookkeeping (diffusers' `feat_cache` list) kept outside the graph, i.e. a decoder
forward of our own; the overlap in `pipeline._blocks` hides the decode behind the DiT instead.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from avatars.liveavatar.dit.attention import SelfAttention
from avatars.liveavatar.dit.audio_injector import AdaLayerNorm
from avatars.liveavatar.dit.blocks import TransformerBlock
from avatars.liveavatar.dit.cross_attention import CrossAttention

if TYPE_CHECKING:
    from avatars.liveavatar.dit import LiveAvatarDiT
    from avatars.liveavatar.pipeline import LiveAvatarPipeline

COMPILE_ENV = "ISPA_COMPILE"  # "1": the app and the loaders compile the regions of the pipeline they build

# (where in the DiT, module class, method name): the regions of every block, then of each audio injection
DIT_REGIONS = (
    ("blocks", TransformerBlock, "attention_input"),
    ("blocks", SelfAttention, "project_local"),
    ("blocks", TransformerBlock, "after_attention"),
    ("audio_injector", AdaLayerNorm, "forward"),
    ("audio_injector", CrossAttention, "forward"),
)


@functools.cache
def _compiled(cls: type, name: str) -> Callable:
    """One compiled function per region and process, shared by every instance (static shapes: one graph each)."""
    return torch.compile(getattr(cls, name), dynamic=False)


def set_compiled_dit(dit: LiveAvatarDiT, enabled: bool = True) -> None:
    """Compile (or, with `enabled=False`, restore to eager) the DiT's regions in place.

    Compilation itself happens at the first call of each region: the first block pays it."""
    for owner, cls, name in DIT_REGIONS:
        for module in dit.get_submodule(owner).modules():
            if type(module) is not cls:
                continue
            if enabled:  # an instance attribute shadows the class's eager method for this module only
                object.__setattr__(module, name, types.MethodType(_compiled(cls, name), module))
            else:
                module.__dict__.pop(name, None)
    if enabled:
        object.__setattr__(dit, "prefill_sink", types.MethodType(_eager(type(dit).prefill_sink), dit))
    else:
        dit.__dict__.pop("prefill_sink", None)


def set_compiled_regions(pipeline: LiveAvatarPipeline, enabled: bool = True) -> None:
    """The pipeline's compiled regions on or off (today: the DiT's; see the module docstring for the VAE)."""
    set_compiled_dit(pipeline.dit, enabled)


def _eager(method: Callable) -> Callable:
    """`method` with every compiled region run eagerly: the once-per-run sink prefill is not worth a graph."""

    @functools.wraps(method)
    def run(*args: object, **kwargs: object) -> object:
        with torch.compiler.set_stance("force_eager"):
            return method(*args, **kwargs)

    return run
