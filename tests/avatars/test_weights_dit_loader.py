"""The DiT loader on tiny checkpoints in the official layout: exact tensors, the LoRA merge, and clear errors."""

import json

import pytest
import torch
from safetensors.torch import save_file

from avatars.liveavatar.config import PRESETS
from avatars.liveavatar.dit.transformer import stored_dtype
from avatars.liveavatar.weights.dit_loader import INDEX_NAME, load_dit, read_weight_map
from avatars.liveavatar.weights.errors import CheckpointError
from avatars.liveavatar.weights.lora import LORA_SCALE
from tests.fixtures.tiny_checkpoints import write_dit_checkpoint, write_lora


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    state = write_dit_checkpoint(root / "dit")
    factors = write_lora(root / "lora" / "liveavatar.safetensors")
    return root, state, factors


def test_layout_is_the_official_four_shards(checkpoint):
    root, state, _ = checkpoint
    names = sorted(p.name for p in (root / "dit").iterdir())
    assert names == [
        "config.json",
        *[f"diffusion_pytorch_model-0000{i}-of-00004.safetensors" for i in range(1, 5)],
        "diffusion_pytorch_model.safetensors.index.json",
    ]
    assert set(read_weight_map(root / "dit")) == set(state)
    assert json.loads((root / "dit" / "config.json").read_text())["dim"] == PRESETS["tiny"].dim


def test_loaded_tensors_equal_what_was_written(checkpoint):
    root, state, _ = checkpoint
    model = load_dit(root / "dit", dtype=torch.bfloat16)
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        kept = stored_dtype(name, torch.bfloat16)  # the DiT's fp32 modules load in fp32
        assert loaded[name].dtype == kept and torch.equal(loaded[name], tensor.to(kept)), name
    assert {t.dtype for t in loaded.values()} == {torch.bfloat16, torch.float32}
    assert not any(p.is_meta for p in model.parameters()) and not model.training


def test_lora_is_merged_as_base_plus_half_b_a(checkpoint):
    root, state, factors = checkpoint
    model = load_dit(root / "dit", lora_path=root / "lora" / "liveavatar.safetensors", dtype=torch.float32)
    loaded = model.state_dict()
    assert LORA_SCALE == 0.5 and len(factors) == 4 * 10 + 2 * 4  # tiny: 4 blocks, 2 audio injectors
    for module in [
        "blocks.0.self_attn.q",
        "blocks.3.self_attn.o",
        "blocks.2.cross_attn.v",
        "blocks.1.ffn.2",
        "audio_injector.injector.1.k",
    ]:
        down, up = factors[module]
        expected = state[f"{module}.weight"].float() + 0.5 * (up.float() @ down.float())
        torch.testing.assert_close(loaded[f"{module}.weight"], expected, rtol=1e-6, atol=1e-7)
        assert not torch.equal(loaded[f"{module}.weight"], state[f"{module}.weight"].float())
    # untouched: biases of targets and non-target weights
    assert torch.equal(loaded["blocks.0.self_attn.q.bias"], state["blocks.0.self_attn.q.bias"].float())
    assert torch.equal(loaded["text_embedding.0.weight"], state["text_embedding.0.weight"].float())


def test_peft_prefixed_keys_load_the_same(checkpoint, tmp_path):
    root, _, factors = checkpoint
    tensors = {}
    for module, (down, up) in factors.items():
        tensors[f"base_model.model.{module}.lora_A.default.weight"] = down
        tensors[f"base_model.model.{module}.lora_B.default.weight"] = up
    save_file(tensors, str(tmp_path / "prefixed.safetensors"))
    a = load_dit(root / "dit", lora_path=root / "lora" / "liveavatar.safetensors", dtype=torch.float32)
    b = load_dit(root / "dit", lora_path=tmp_path / "prefixed.safetensors", dtype=torch.float32)
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name


def test_missing_shard_is_named(checkpoint, tmp_path):
    root, _, _ = checkpoint
    partial = tmp_path / "partial"
    partial.mkdir()
    for path in (root / "dit").iterdir():
        if "00003-of" not in path.name:
            (partial / path.name).write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="missing shard files diffusion_pytorch_model-00003-of-00004"):
        load_dit(partial)


def test_truncated_shard_is_reported(checkpoint, tmp_path):
    root, _, _ = checkpoint
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in (root / "dit").iterdir():
        data = path.read_bytes()
        (broken / path.name).write_bytes(data[: len(data) // 2] if "00002-of" in path.name else data)
    with pytest.raises(
        CheckpointError, match="00002-of-00004.safetensors is not a readable safetensors file"
    ):
        load_dit(broken)


def test_index_with_unknown_and_missing_keys_lists_them(checkpoint, tmp_path):
    root, _, _ = checkpoint
    changed = tmp_path / "changed"
    changed.mkdir()
    for path in (root / "dit").iterdir():
        (changed / path.name).write_bytes(path.read_bytes())
    index = json.loads((changed / INDEX_NAME).read_text())
    shard = index["weight_map"].pop("head.head.weight")
    index["weight_map"]["blocks.0.self_attn.extra.weight"] = shard
    (changed / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        load_dit(changed)
    assert "missing keys: head.head.weight" in str(err.value)
    assert "unexpected keys: blocks.0.self_attn.extra.weight" in str(err.value)


def test_lora_with_an_unknown_module_is_named(checkpoint, tmp_path):
    root, _, factors = checkpoint
    down, up = factors["blocks.0.self_attn.q"]
    tensors = {
        "blocks.0.self_attn.q.lora_A.default.weight": down,
        "blocks.0.self_attn.q.lora_B.default.weight": up,
        "blocks.0.self_attn.qq.lora_A.default.weight": down.clone(),
        "blocks.0.self_attn.qq.lora_B.default.weight": up.clone(),
    }
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"match no target module of the model: blocks\.0\.self_attn\.qq"
    ):
        load_dit(root / "dit", lora_path=tmp_path / "bad.safetensors")


def test_lora_half_pair_and_wrong_shape_are_named(checkpoint, tmp_path):
    root, _, factors = checkpoint
    down, up = factors["blocks.1.ffn.0"]
    save_file({"blocks.1.ffn.0.lora_A.default.weight": down}, str(tmp_path / "half.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing their lora_A or lora_B factor: blocks\.1\.ffn\.0"):
        load_dit(root / "dit", lora_path=tmp_path / "half.safetensors")
    save_file(
        {"blocks.1.ffn.0.lora_A.default.weight": down, "blocks.1.ffn.0.lora_B.default.weight": up[:-1]},
        str(tmp_path / "shape.safetensors"),
    )
    with pytest.raises(CheckpointError, match=r"shapes do not fit their modules: blocks\.1\.ffn\.0"):
        load_dit(root / "dit", lora_path=tmp_path / "shape.safetensors")


def test_wrong_config_file_is_reported(checkpoint, tmp_path):
    root, _, _ = checkpoint
    other = tmp_path / "other"
    other.mkdir()
    for path in (root / "dit").iterdir():
        (other / path.name).write_bytes(path.read_bytes())
    (other / "config.json").write_text("<html>rate limited</html>")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_dit(other)
    (other / "config.json").write_text(json.dumps({"dim": 63, "num_heads": 4}))
    with pytest.raises(CheckpointError, match="does not describe a supported"):
        load_dit(other)


def test_shape_mismatch_names_the_tensor(checkpoint, tmp_path):
    root, state, _ = checkpoint
    changed = tmp_path / "reshaped"
    changed.mkdir()
    for path in (root / "dit").iterdir():
        (changed / path.name).write_bytes(path.read_bytes())
    weight_map = read_weight_map(changed)
    shard = weight_map["head.head.weight"]
    tensors = {name: state[name] for name, file in weight_map.items() if file == shard}
    tensors["head.head.weight"] = tensors["head.head.weight"][:-1].clone()
    save_file(tensors, str(changed / shard))
    with pytest.raises(
        CheckpointError, match=r"head\.head\.weight has shape \(63, 64\), the model expects \(64, 64\)"
    ):
        load_dit(changed)
