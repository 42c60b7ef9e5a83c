"""The DiT's parameters are the official checkpoint's: every name, shape and the order of the state dict."""

import json
import re
from pathlib import Path

import torch

from avatars.liveavatar.config import PRESETS
from avatars.liveavatar.dit import LiveAvatarDiT

MANIFEST = (
    Path(__file__).resolve().parents[3] / "shared" / "reference" / "liveavatar_s2v14b_dit_manifest.json"
)


def _build(name: str) -> LiveAvatarDiT:
    with torch.device("meta"):
        return LiveAvatarDiT.from_config(PRESETS[name])


def test_14b_state_dict_equals_the_manifest():
    manifest = json.loads(MANIFEST.read_text())
    model = _build("14b")
    ours = [(name, list(t.shape)) for name, t in model.state_dict().items()]
    assert len(ours) == 1260
    assert ours == list(manifest["params"].items())
    assert sum(p.numel() for p in model.parameters()) == manifest["total_params"] == 16_295_755_609
    assert all(p.is_meta for p in model.parameters())


def test_tiny_model_has_the_same_parameter_names_up_to_layer_counts():
    def pattern(names):
        return {re.sub(r"\.\d+\.", ".N.", n) for n in names}

    tiny = _build("tiny").state_dict()
    full = _build("14b").state_dict()
    assert pattern(tiny) == pattern(full)
    blocks = {int(m.group(1)) for n in tiny if (m := re.match(r"blocks\.(\d+)\.", n))}
    injectors = {int(m.group(1)) for n in tiny if (m := re.match(r"audio_injector\.injector\.(\d+)\.", n))}
    assert blocks == set(range(4)) and injectors == {0, 1}
    assert tiny["casual_audio_encoder.weights"].shape == (1, 3, 1, 1)
