"""DiTConfig: official key names, round trips, presets and validation."""

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from avatars.liveavatar.config import PRESETS, DiTConfig

MANIFEST = (
    Path(__file__).resolve().parents[3] / "shared" / "reference" / "liveavatar_s2v14b_dit_manifest.json"
)


def test_14b_preset_holds_every_manifest_config_value():
    manifest_config = json.loads(MANIFEST.read_text())["config"]
    as_dict = PRESETS["14b"].to_dict()
    assert {key: as_dict[key] for key in manifest_config} == manifest_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip_is_lossless(name):
    config = PRESETS[name]
    text = json.dumps(config.to_dict())
    assert DiTConfig.from_dict(json.loads(text)) == config


def test_from_dict_ignores_file_metadata_and_logs_unknown_keys(caplog):
    raw = PRESETS["14b"].to_dict() | {
        "_class_name": "WanModel_S2V",
        "_diffusers_version": "0.35.0",
        "motion_token_num": 1024,
    }
    with caplog.at_level(logging.WARNING, logger="avatars.liveavatar.config"):
        config = DiTConfig.from_dict(raw)
    assert config == PRESETS["14b"]
    assert "motion_token_num" in caplog.text
    assert "_class_name" not in caplog.text


def test_tiny_preset_is_the_agreed_contract():
    tiny = PRESETS["tiny"]
    agreed = dict(dim=64, ffn_dim=128, freq_dim=32, num_heads=4, num_layers=4, audio_inject_layers=(0, 2))
    agreed |= dict(audio_dim=32, text_dim=32, text_len=16, num_audio_hidden_states=3, in_dim=16, out_dim=16)
    agreed |= dict(cond_dim=16, patch_size=(1, 2, 2), motion_frames=73)
    assert {key: getattr(tiny, key) for key in agreed} == agreed
    # Everything else is the official value.
    others = {f.name for f in dataclasses.fields(DiTConfig)} - set(agreed)
    assert {k: getattr(tiny, k) for k in others} == {k: getattr(PRESETS["14b"], k) for k in others}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"dim": 66}, "divisible by num_heads"),
        ({"dim": -8}, "positive integer"),
        ({"num_layers": 2, "audio_inject_layers": [0, 2]}, "audio_inject_layers"),
        ({"audio_inject_layers": [0, 0]}, "audio_inject_layers"),
        ({"audio_inject_layers": "0,4"}, "list of integers"),
        ({"adain_mode": "normal"}, "not supported"),
        ({"enable_framepack": False}, "not supported"),
        ({"patch_size": [1, 4, 4]}, "not supported"),
        ({"motion_frames": 72}, "motion_frames"),
        ({"eps": 0}, "eps"),
    ],
)
def test_invalid_values_raise_value_error(change, message):
    with pytest.raises(ValueError, match=message):
        DiTConfig.from_dict(PRESETS["tiny"].to_dict() | change)


def test_from_dict_rejects_a_non_mapping():
    with pytest.raises(ValueError, match="mapping"):
        DiTConfig.from_dict([("dim", 64)])
