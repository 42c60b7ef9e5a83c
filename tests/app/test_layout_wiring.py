"""The page's wiring by name: the generation events' outputs are `RunOutputs`' fields in order, and each handler
gets the components named by its parameters."""

from __future__ import annotations

import inspect
from dataclasses import fields

import pytest

from app import main
from app.layout import RunOutputs

# The published order of `/generate`'s outputs (gradio_client users read them by position).
API_OUTPUTS = [
    "player_a",
    "player_b",
    "kv_plot",
    "layer_map",
    "run_summary",
    "drift_table",
    "status",
    "downloads",
    "report",
]


def dependency(demo, api_name=None, fn_name=None):
    for dep, fn in zip(demo.config["dependencies"], demo.fns.values(), strict=True):
        if (api_name and dep.get("api_name") == api_name) or (fn_name and fn.name == fn_name):
            return dep
    raise AssertionError(f"no event for {api_name or fn_name}")


def label(demo, block_id: int) -> str:
    block = demo.blocks[block_id]
    return block.elem_id or block.label


def test_run_outputs_fields_are_the_published_output_order() -> None:
    assert [f.name for f in fields(RunOutputs)] == API_OUTPUTS
    values = RunOutputs(*range(len(API_OUTPUTS)))
    assert values.as_list() == list(range(len(API_OUTPUTS)))
    assert [RunOutputs.position(name) for name in API_OUTPUTS] == list(range(len(API_OUTPUTS)))


def test_generation_events_are_wired_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    demo = main.build_demo()
    check_wiring(demo, main.generate, dependency(demo, api_name="generate"))
    check_wiring(demo, main.generate_live, dependency(demo, fn_name="generate_live"))


def check_wiring(demo, handler, dep) -> None:
    outputs = [label(demo, i) for i in dep["outputs"]]
    expected = ["player_a", "player_b", "kv_plot", "layer_map", "run_summary", "drift", "status"]
    assert outputs[: len(expected)] == expected
    assert [type(demo.blocks[i]).__name__ for i in dep["outputs"][-2:]] == ["File", "JSON"]
    # Each input is the component of the handler's parameter of that name.
    parameters = [n for n in inspect.signature(handler).parameters if n != "request"]
    by_label = {
        "portrait": "portrait",
        "audio": "speech",
        "text": "tts",
        "prompt": "Prompt (optional)",
        "policy": "policy",
        "k_fraction": "k_fraction",
        "t_warm": "T_warm (latent frames)",
        "seed": "Seed",
        "model": "Model",
        "lam": "λ (ridge regulariser of the absorb)",
        "size": "Size",
        "kv_format": "KV-cache format",
        "refresh_sink": "Refresh the sink at clip 1",
        "owner_token": "Owner token",
    }
    assert [label(demo, i) for i in dep["inputs"]] == [by_label[name] for name in parameters]
