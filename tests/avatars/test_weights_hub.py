"""Resolving weights from a local folder, the download calls (no network), and incomplete-download errors."""

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


def test_download_asks_each_repo_for_its_files_only(tiny_root, tmp_path):
    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        source = tiny_root / kwargs["repo_id"].split("/")[-1]
        shutil.copytree(source, kwargs["local_dir"], dirs_exist_ok=True)
        return kwargs["local_dir"]

    paths = hub.download_weights(tmp_path, download=fake_snapshot_download)
    assert [c["repo_id"] for c in calls] == [
        "Wan-AI/Wan2.2-S2V-14B",
        "Quark-Vision/Live-Avatar",
        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    ]
    base, lora, diffusers = (c["allow_patterns"] for c in calls)
    assert "config.json" in base and "diffusion_pytorch_model.safetensors.index.json" in base
    assert "diffusion_pytorch_model-*-of-*.safetensors" in base
    assert any(p.startswith("wav2vec2-large-xlsr-53-english/") for p in base)
    assert not any(
        ".pth" in p or "google/" in p for p in base
    )  # the .pth T5/VAE and their tokenizer are not fetched
    assert lora == ["liveavatar.safetensors"]
    assert diffusers == ["text_encoder/*", "tokenizer/*", "vae/*"]
    assert [c["local_dir"] for c in calls] == [
        str(tmp_path / "Wan2.2-S2V-14B"),
        str(tmp_path / "Live-Avatar"),
        str(tmp_path / "Wan2.1-T2V-1.3B-Diffusers"),
    ]
    assert all(c["tqdm_class"] is not None for c in calls)
    assert paths == hub.WeightPaths.under(tmp_path)


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


def test_missing_root_is_reported(tmp_path):
    with pytest.raises(CheckpointError, match="weights folder not found"):
        hub.resolve_weights(tmp_path / "nowhere")
