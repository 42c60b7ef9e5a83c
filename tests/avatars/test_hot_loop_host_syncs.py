"""The per-forward hot loop (DiT `forward_block` through the ISPA session) never makes the host wait for the device.

On CUDA, reading a value on the host (.item(), float(t), .tolist(), `if t:`) and a blocking host-to-device copy both
wait for all queued GPU work. Run on the `meta` device, tensors have shapes but no data, so such a read raises, and a
spy records every copy of host data onto the device. `end_block()` reads the block's history mass on purpose, once
per block; the meta runs step over that read (there is no value to read there).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from avatars.liveavatar.config import PRESETS
from avatars.liveavatar.dit import LiveAvatarDiT, TextContext
from avatars.liveavatar.dit.audio_encoder import AudioTokens
from ispa import AttentionSession, CacheLayout, FullPolicy, ISPAPolicy, SaliencePolicy, WindowPolicy

CONFIG = PRESETS["tiny"]
LATENT = (8, 8)
STEPS = 4


class _DeviceOps(TorchDispatchMode):
    """Records host reads of tensor values and blocking copies from CPU memory to another device."""

    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events = events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.events.append("value read on the host")
        elif func is torch.ops.aten._to_copy.default:
            target = kwargs.get("device")
            onto_device = args[0].device.type == "cpu" and target is not None and target.type != "cpu"
            if onto_device and not kwargs.get("non_blocking", False):
                self.events.append(f"blocking copy to {target} of {tuple(args[0].shape)}")
        elif func is torch.ops.aten.copy_.default:
            destination, source = args[0], args[1]
            if source.device.type == "cpu" and destination.device.type != "cpu":
                self.events.append(f"copy_ to {destination.device} of {tuple(source.shape)}")
        return func(*args, **kwargs)


class _FactoryCopies(TorchFunctionMode):
    """`torch.tensor` / `torch.as_tensor` put Python data on a device below the dispatcher: catch them here."""

    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events = events

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor):
            device = kwargs.get("device")
            if device is not None and torch.device(device).type != "cpu":
                self.events.append(f"{func.__name__} from host data onto {device}")
        return func(*args, **kwargs)


@contextmanager
def host_traffic() -> Iterator[list[str]]:
    events: list[str] = []
    with _FactoryCopies(events), _DeviceOps(events):
        yield events


def make_model(device: str) -> LiveAvatarDiT:
    torch.manual_seed(0)
    with torch.device(device):
        return LiveAvatarDiT.from_config(CONFIG).eval()


def inputs(device: str):
    gen = torch.Generator().manual_seed(1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device)

    context = TextContext(randn(1, CONFIG.text_len, CONFIG.dim))
    audio = AudioTokens(randn(1, 3, CONFIG.num_audio_token + 1, CONFIG.dim), randn(1, 3, 1, CONFIG.dim))
    return randn, context, audio


def start(model: LiveAvatarDiT, policy, device: str):
    randn, context, audio = inputs(device)
    layout = CacheLayout(
        block_tokens=3 * model.tokens_per_frame(*LATENT),
        history_blocks=3,
        num_rings=STEPS,
        frames_per_block=3,
    )
    session = AttentionSession(policy, CONFIG.num_layers, layout)
    model.prefill_sink(session, randn(1, 16, 1, *LATENT), randn(1, 16, 19, *LATENT), context)
    return session, randn, context, audio


TIMESTEPS = [1000.0, 857.7, 602.2, 8.9]


def forward_block(model, session, latents, context, audio, block: int, step: int) -> torch.Tensor:
    return model.forward_block(
        session,
        latents,
        TIMESTEPS[step],
        context,
        audio,
        frame_index=3 * block,
        ring=step,
        ref_shift=4 + block,
    )


@pytest.mark.parametrize("policy", [FullPolicy(), ISPAPolicy(t_warm=30)], ids=["full", "ispa-warmup"])
def test_forwards_copy_nothing_onto_the_device_and_read_nothing_back(policy, monkeypatch):
    model = make_model("meta")
    session, randn, context, audio = start(model, policy, "meta")
    monkeypatch.setattr(session, "_read_block_values", lambda: (None, []))  # the per-block read; no meta data
    reports = []
    # Block 0 has no history; block 1 merges history (and ISPA accumulates statistics).
    for block in range(2):
        latents = [randn(1, 16, 3, *LATENT) for _ in range(STEPS)]  # host data, made outside the watch
        for step in range(STEPS):
            with host_traffic() as events:
                flow = forward_block(model, session, latents[step], context, audio, block, step)
            assert events == [], (block, step)
            assert flow.shape == latents[step].shape
        reports.append(session.end_block())
    collected = [r.stats_bytes > 0 for r in reports]
    assert collected == ([False, False] if isinstance(policy, FullPolicy) else [False, True])


def test_the_spy_sees_what_it_must():
    with host_traffic() as events:
        torch.zeros(3).to("meta")
        torch.as_tensor(0.5, device="meta")
        torch.ones(2).sum().item()
    assert len(events) == 3


@pytest.mark.parametrize(
    ("policy", "after"),
    [
        (ISPAPolicy(k_fraction=0.5, t_warm=6), "absorbed"),
        (WindowPolicy(k_fraction=0.5, t_warm=6), "evicted"),
        (SaliencePolicy(k_fraction=0.5, t_warm=6), "evicted"),
    ],
    ids=["ispa", "window", "salience"],
)
def test_no_value_is_read_in_any_phase_on_cpu(policy, after):
    """Warmup, the transition block, then local or trimmed layers: forwards never call .item() and the like."""
    model = make_model("cpu")
    session, randn, context, audio = start(model, policy, "cpu")
    phases = []
    for block in range(4):
        for step in range(STEPS):
            latents = randn(1, 16, 3, *LATENT)
            with host_traffic() as events:
                forward_block(model, session, latents, context, audio, block, step)
            assert events == [], (block, step)
        phases.append(session.end_block().phase)
    assert phases == ["warmup", "warmup", after, after]
