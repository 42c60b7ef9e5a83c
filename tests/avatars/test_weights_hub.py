"""Resolving weights from a local folder, and incomplete-download errors (the download itself:
test_weights_download.py)."""

import json
import shutil

import pytest

from avatars.liveavatar.weights import hub
from avatars.liveavatar.weights.errors import CheckpointError
from tests.fixtures.tiny_checkpoints import write_tiny_weights


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    write_tiny_weights(root)
    return root


def _copy(root, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(root, target)
    return target


def test_local_folder_resolves_to_the_repo_layout(tiny_root):
    paths = hub.resolve_weights(tiny_root)
    assert paths.dit_dir == tiny_root / "Wan2.2-S2V-14B"
    assert paths.wav2vec2_dir == tiny_root / "Wan2.2-S2V-14B" / "wav2vec2-large-xlsr-53-english"
    assert paths.lora_file == tiny_root / "Live-Avatar" / "liveavatar.safetensors"
    assert paths.text_encoder_dir == tiny_root / "Wan2.1-T2V-1.3B-Diffusers" / "text_encoder"
    assert paths.tokenizer_dir == tiny_root / "Wan2.1-T2V-1.3B-Diffusers" / "tokenizer"
    assert paths.vae_dir == tiny_root / "Wan2.1-T2V-1.3B-Diffusers" / "vae"


def test_partial_download_lists_every_missing_file(tiny_root, tmp_path):
    root = _copy(tiny_root, tmp_path)
    (root / "Wan2.2-S2V-14B" / "diffusion_pytorch_model-00002-of-00004.safetensors").unlink()
    (root / "Live-Avatar" / "liveavatar.safetensors").unlink()
    shutil.rmtree(root / "Wan2.1-T2V-1.3B-Diffusers" / "vae")
    with pytest.raises(CheckpointError) as err:
        hub.resolve_weights(root)
    message = str(err.value)
    assert (
        "missing: " + str(root / "Wan2.2-S2V-14B" / "diffusion_pytorch_model-00002-of-00004.safetensors")
        in message
    )
    assert "missing: " + str(root / "Live-Avatar" / "liveavatar.safetensors") in message
    assert "missing: " + str(root / "Wan2.1-T2V-1.3B-Diffusers" / "vae" / "config.json") in message
    assert "00001-of-00004" not in message


def test_damaged_files_are_reported(tiny_root, tmp_path):
    root = _copy(tiny_root, tmp_path)
    shard = root / "Wan2.2-S2V-14B" / "diffusion_pytorch_model-00004-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    (root / "Live-Avatar" / "liveavatar.safetensors").write_text("<html>Access denied</html>")
    with pytest.raises(CheckpointError) as err:
        hub.resolve_weights(root)
    assert f"damaged: {shard} (truncated" in str(err.value)
    assert "liveavatar.safetensors (not a safetensors file" in str(err.value)


def _write_safetensors(path, header, data):
    """A file in the safetensors layout, header written by hand (to make headers the library refuses)."""
    header_bytes = json.dumps(header).encode()
    path.write_bytes(len(header_bytes).to_bytes(8, "little") + header_bytes + data)


def test_files_the_safetensors_library_refuses_are_reported(tiny_root, tmp_path):
    """The library checks more than the end offset: what it would refuse at load time is damaged now."""
    root = _copy(tiny_root, tmp_path)
    shard = root / "Wan2.2-S2V-14B" / "diffusion_pytorch_model-00001-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes() + b"junk")  # bytes past the last tensor
    lora = root / "Live-Avatar" / "liveavatar.safetensors"
    # two f32 values need 8 bytes, the offsets give 4 (yet the file ends where the offsets say)
    _write_safetensors(lora, {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(4))
    vae = root / "Wan2.1-T2V-1.3B-Diffusers" / "vae" / "diffusion_pytorch_model.safetensors"
    _write_safetensors(vae, {"w": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, bytes(4))
    with pytest.raises(CheckpointError) as err:
        hub.resolve_weights(root)
    message = str(err.value)
    for damaged in (shard, lora, vae):
        assert f"damaged: {damaged} (not a safetensors file (" in message
    assert "truncated" not in message


def test_a_valid_file_with_metadata_is_accepted(tiny_root, tmp_path):
    root = _copy(tiny_root, tmp_path)
    lora = root / "Live-Avatar" / "liveavatar.safetensors"
    header = {
        "__metadata__": {"format": "pt"},
        "w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
    }
    _write_safetensors(lora, header, bytes(12))
    assert hub.resolve_weights(root).lora_file == lora


def test_missing_root_is_reported(tmp_path):
    with pytest.raises(CheckpointError, match="weights folder not found"):
        hub.resolve_weights(tmp_path / "nowhere")
