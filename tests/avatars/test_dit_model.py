"""The tiny LiveAvatarDiT end to end through a Full ISPA session: prefill, blocks × 4 denoising steps."""

import inspect
import math
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from avatars.liveavatar.config import PRESETS
from avatars.liveavatar.dit import LiveAvatarDiT, block_audio_window
from avatars.liveavatar.dit.transformer import FP32_MODULES, stored_dtype
from ispa import AttentionSession, CacheLayout, FullPolicy, ISPAPolicy

CONFIG = PRESETS["tiny"]
LATENT = 8  # 64×64 video
TOKENS_PER_FRAME = 16
SINK_TOKENS = 40  # 16 reference + 16 + 4 + 4 motion tokens
TIMESTEPS = [1000.0, 857.69, 602.15, 8.93]
BATCH = 2


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights with O(1) activations; also un-zeroes the zero-initialised audio/pose modules."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2 and "modulation" not in name:
                p.copy_(noise / math.prod(p.shape[1:]) ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)


@pytest.fixture(scope="module")
def model() -> LiveAvatarDiT:
    dit = LiveAvatarDiT.from_config(CONFIG).eval()
    _randomize(dit, seed=0)
    return dit


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return {
        "t5": torch.randn(BATCH, 7, CONFIG.text_dim, generator=g),
        "ref": torch.randn(BATCH, 16, 1, LATENT, LATENT, generator=g),
        "motion": torch.randn(BATCH, 16, 19, LATENT, LATENT, generator=g),
        "audio": torch.randn(BATCH, CONFIG.num_audio_hidden_states, CONFIG.audio_dim, 36, generator=g),
        "noise": torch.randn(3, BATCH, 16, 3, LATENT, LATENT, generator=g),
    }


def _session(policy=None) -> AttentionSession:
    layout = CacheLayout(block_tokens=3 * TOKENS_PER_FRAME, history_blocks=3, num_rings=4, frames_per_block=3)
    return AttentionSession(policy or FullPolicy(), num_layers=CONFIG.num_layers, layout=layout)


def _token_bytes(dtype=torch.float32) -> int:
    """Bytes of one token's key + value in one layer."""
    return 2 * BATCH * CONFIG.dim * dtype.itemsize


def _run_block(model, session, inputs, context, block, ring_steps=range(4), ref_shift=12):
    audio = model.encode_audio(block_audio_window(inputs["audio"], 12 * block, 12))
    flows = []
    for step in ring_steps:
        flows.append(
            model.forward_block(
                session, inputs["noise"][block], TIMESTEPS[step], context, audio, 3 * block, step, ref_shift
            )
        )
    return flows


def test_streaming_run_shapes_finiteness_and_kv_bytes(model, inputs):
    assert model.tokens_per_frame(LATENT, LATENT) == TOKENS_PER_FRAME
    assert model.sink_token_count(LATENT, LATENT) == SINK_TOKENS
    session = _session()
    context = model.embed_text(inputs["t5"])
    assert context.states.shape == (BATCH, CONFIG.text_len, CONFIG.dim)
    model.prefill_sink(session, inputs["ref"], inputs["motion"], context)
    sink_bytes = CONFIG.num_layers * SINK_TOKENS * _token_bytes()
    assert session.cache.nbytes() == sink_bytes
    assert session.sink(0)[0].shape == (BATCH, SINK_TOKENS, CONFIG.num_heads, CONFIG.head_dim)

    slot_bytes = CONFIG.num_layers * 4 * 3 * TOKENS_PER_FRAME * _token_bytes()  # one 3-frame block in 4 rings
    for block in range(3):
        for flow in _run_block(model, session, inputs, context, block):
            assert flow.shape == (BATCH, 16, 3, LATENT, LATENT)
            assert flow.dtype == torch.float32
            assert torch.isfinite(flow).all()
        report = session.end_block()
        assert report.kv_bytes == sink_bytes + (block + 1) * slot_bytes  # ring slots allocated as written
        assert session.cache.layers[0].filled_blocks(ring=3) == block + 1


def test_model_keeps_no_state_between_sessions(model, inputs):
    context = model.embed_text(inputs["t5"])
    first, second = _session(), _session()
    model.prefill_sink(first, inputs["ref"], inputs["motion"], context)
    model.prefill_sink(second, inputs["ref"], inputs["motion"], context)
    a0 = _run_block(model, first, inputs, context, block=0)
    first.end_block()
    b0 = _run_block(model, second, inputs, context, block=0)  # interleaved with the first session
    second.end_block()
    a1 = _run_block(model, first, inputs, context, block=1)
    b1 = _run_block(model, second, inputs, context, block=1)
    assert all(torch.equal(x, y) for x, y in zip(a0 + a1, b0 + b1, strict=True))


def test_history_audio_and_reference_shift_all_change_the_prediction(model, inputs):
    context = model.embed_text(inputs["t5"])

    def fresh():
        session = _session()
        model.prefill_sink(session, inputs["ref"], inputs["motion"], context)
        return session

    with_history = fresh()
    _run_block(model, with_history, inputs, context, block=0, ring_steps=[0])
    with_history.end_block()
    baseline = _run_block(model, with_history, inputs, context, block=1, ring_steps=[0])[0]
    no_history = _run_block(model, fresh(), inputs, context, block=1, ring_steps=[0])[0]
    assert not torch.allclose(baseline, no_history, atol=1e-4)

    silent = dict(inputs, audio=torch.zeros_like(inputs["audio"]))
    session = fresh()
    _run_block(model, session, inputs, context, block=0, ring_steps=[0])
    session.end_block()
    without_audio = _run_block(model, session, silent, context, block=1, ring_steps=[0])[0]
    assert not torch.allclose(baseline, without_audio, atol=1e-4)

    # Block 1 starts at frame 3: with ref_shift 30 the reference is at time 33 instead of 30.
    session = fresh()
    _run_block(model, session, inputs, context, block=0, ring_steps=[0], ref_shift=30)
    session.end_block()
    shifted = _run_block(model, session, inputs, context, block=1, ring_steps=[0], ref_shift=30)[0]
    assert not torch.allclose(baseline, shifted, atol=1e-4)


def test_ispa_session_matches_full_until_absorbing_then_frees_half_the_rings(model, inputs):
    context = model.embed_text(inputs["t5"])
    full, ispa = _session(), _session(ISPAPolicy(k_fraction=0.5, t_warm=6))
    for session in (full, ispa):
        model.prefill_sink(session, inputs["ref"], inputs["motion"], context)
    for block in range(2):  # warmup: 6 latent frames, bit-identical to Full
        a = _run_block(model, full, inputs, context, block)
        b = _run_block(model, ispa, inputs, context, block)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        full.end_block()
        report = ispa.end_block()
    assert report.event == "absorbed" and len(report.l_layers) == 2
    after = _run_block(model, ispa, inputs, context, block=2)
    assert all(torch.isfinite(flow).all() for flow in after)
    report = ispa.end_block()
    rings = 4 * 3 * 3 * TOKENS_PER_FRAME * _token_bytes()
    assert report.kv_bytes == CONFIG.num_layers * SINK_TOKENS * _token_bytes() + 2 * rings


def test_forward_block_docstring_documents_every_argument():
    doc = LiveAvatarDiT.forward_block.__doc__
    documented = re.findall(r"^ {12}(\w+):", doc.split("Args:")[1].split("Returns:")[0], flags=re.M)
    assert documented == [name for name in inspect.signature(LiveAvatarDiT.forward_block).parameters][1:]


def test_bfloat16_run_tracks_fp32(model, inputs):
    context32 = model.embed_text(inputs["t5"])
    session32 = _session()
    model.prefill_sink(session32, inputs["ref"], inputs["motion"], context32)
    flow32 = _run_block(model, session32, inputs, context32, block=0, ring_steps=[0])[0]

    half = LiveAvatarDiT.from_config(CONFIG).eval()
    half.load_state_dict(model.state_dict())
    half.to(torch.bfloat16)
    bf16_inputs = dict(inputs, noise=inputs["noise"].bfloat16())
    context = half.embed_text(inputs["t5"])
    session = _session()
    half.prefill_sink(session, inputs["ref"], inputs["motion"], context)
    flow = _run_block(half, session, bf16_inputs, context, block=0, ring_steps=[0])[0]
    assert flow.dtype == torch.bfloat16 and session.sink(0)[0].dtype == torch.bfloat16
    relative = (flow.float() - flow32).norm() / flow32.norm()
    assert relative < 0.05


def test_fp32_modules_are_stored_in_fp32_and_no_bf16_forward_recasts_them(model, inputs):
    half = LiveAvatarDiT.from_config(CONFIG).eval()
    half.load_state_dict(model.state_dict())
    half.to(torch.bfloat16)  # `.to(dtype)` casts the rest and keeps FP32_MODULES in fp32
    dtypes = {name: t.dtype for name, t in half.state_dict().items()}
    assert dtypes == {name: stored_dtype(name, torch.bfloat16) for name in dtypes}
    assert {
        dtypes[f"{module}.{name}"]
        for module in FP32_MODULES
        for name, _ in half.get_submodule(module).named_parameters()
    } == {torch.float32}
    fp32_storage = {p.data_ptr() for module in FP32_MODULES for p in half.get_submodule(module).parameters()}

    casts = []

    class CastRecorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in fp32_storage:
                casts.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    context = half.embed_text(inputs["t5"])
    session = _session()
    with CastRecorder():
        half.prefill_sink(session, inputs["ref"], inputs["motion"], context)
        _run_block(
            half, session, dict(inputs, noise=inputs["noise"].bfloat16()), context, block=0, ring_steps=[0]
        )
    assert casts == []


def test_local_keys_and_values_go_into_one_reused_buffer_without_concatenation(model, inputs):
    context = model.embed_text(inputs["t5"])
    session = _session()
    model.prefill_sink(session, inputs["ref"], inputs["motion"], context)
    seen = []
    attend = session.self_attention

    def recording(layer, q, local_k, local_v, new_k, new_v, out_proj, ring=0):
        seen.append((local_k.data_ptr(), local_v.data_ptr()))
        # the current block's keys and values are views of the buffers' tails, right after the sink
        assert new_k.data_ptr() == local_k[:, SINK_TOKENS:].data_ptr()
        assert new_v.data_ptr() == local_v[:, SINK_TOKENS:].data_ptr()
        return attend(layer, q, local_k, local_v, new_k, new_v, out_proj, ring=ring)

    session.self_attention = recording
    local_tokens = SINK_TOKENS + 3 * TOKENS_PER_FRAME
    concatenated = []

    class CatRecorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.cat.default and out.ndim == 4 and out.shape[1] == local_tokens:
                concatenated.append(tuple(out.shape))
            return out

    with CatRecorder():
        _run_block(model, session, inputs, context, block=0, ring_steps=[0, 1])
    assert len(seen) == 2 * CONFIG.num_layers and len(set(seen)) == 1  # one pair for every layer and forward
    assert concatenated == []


def test_unpatchify_inverts_wan_patch_order(model):
    # Official unpatchify: view(f, h, w, p, q, r, c) then einsum 'fhwpqrc->cfphqwr'.
    tokens = torch.randn(1, 3 * 4 * 4, 1 * 2 * 2 * 16)
    official = torch.einsum("fhwpqrc->cfphqwr", tokens[0].view(3, 4, 4, 1, 2, 2, 16)).reshape(16, 3, 8, 8)
    assert torch.equal(model._unpatchify(tokens, 3, 4, 4)[0], official)


def test_bad_arguments_raise_value_error(model, inputs):
    context = model.embed_text(inputs["t5"])
    session = _session()
    model.prefill_sink(session, inputs["ref"], inputs["motion"], context)
    audio = model.encode_audio(block_audio_window(inputs["audio"], 0, 12))
    latents = inputs["noise"][0]
    call = dict(timestep=500.0, context=context, audio=audio, frame_index=0, ring=0, ref_shift=4)
    with pytest.raises(ValueError, match="ref_shift"):
        model.forward_block(session, latents, **(call | {"ref_shift": 31}))
    with pytest.raises(ValueError, match="frame_index"):
        model.forward_block(session, latents, **(call | {"frame_index": -3}))
    with pytest.raises(ValueError, match="timestep"):
        model.forward_block(session, latents, **(call | {"timestep": torch.ones(3)}))
    with pytest.raises(ValueError, match="multiples of 8"):
        model.forward_block(session, torch.zeros(BATCH, 16, 3, 12, 12), **call)
    with pytest.raises(ValueError, match="sink holds 40 tokens"):
        model.forward_block(session, torch.zeros(BATCH, 16, 3, 16, 16), **call)
    with pytest.raises(ValueError, match="audio"):
        model.forward_block(session, latents[:, :, :2], **call)
    with pytest.raises(ValueError, match="text_len"):
        model.embed_text(torch.zeros(1, CONFIG.text_len + 1, CONFIG.text_dim))
    with pytest.raises(ValueError, match="ref_latent"):
        model.prefill_sink(session, inputs["motion"], inputs["motion"], context)
    with pytest.raises(ValueError, match="context must be the TextContext"):
        model.forward_block(session, latents, **(call | {"context": context.states}))


def test_text_keys_and_values_are_projected_once_per_run_and_reused_exactly(model, inputs):
    projections = []
    hooks = [
        block.cross_attn.k.register_forward_hook(lambda *args: projections.append(1))
        for block in model.blocks
    ]
    try:
        context = model.embed_text(inputs["t5"])
        session = _session()
        model.prefill_sink(session, inputs["ref"], inputs["motion"], context)
        cached = _run_block(model, session, inputs, context, block=0)  # 4 forwards reusing the run's K/V
        assert (
            len(projections) == context.projected_blocks() == CONFIG.num_layers
        )  # once per block, not per forward

        # Reference: a fresh context for every call, i.e. the text K/V recomputed in each forward as before
        fresh_session = _session()
        model.prefill_sink(fresh_session, inputs["ref"], inputs["motion"], model.embed_text(inputs["t5"]))
        audio = model.encode_audio(block_audio_window(inputs["audio"], 0, 12))
        for step, flow in enumerate(cached):
            recomputed = model.forward_block(
                fresh_session,
                inputs["noise"][0],
                TIMESTEPS[step],
                model.embed_text(inputs["t5"]),
                audio,
                0,
                step,
                12,
            )
            assert torch.equal(flow, recomputed), step
    finally:
        for hook in hooks:
            hook.remove()
