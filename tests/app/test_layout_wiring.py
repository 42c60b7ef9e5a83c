"""The page's wiring by name: the generation events' outputs are `RunOutputs`' fields in order, each handler gets
the components named by its parameters, and passes them on by name (never through `locals()`)."""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest

from app import main
from app.inputs import EngineChoices
from app.layout import RunOutputs

APP_DIR = Path(main.__file__).parent

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
        "steps": "Denoising steps",
        "owner_token": "Owner token",
        "compare_a": "compare_a",
        "compare_b": "compare_b",
    }
    assert [label(demo, i) for i in dep["inputs"]] == [by_label[name] for name in parameters]


# ------------------------------------------------------------------------------------ explicit handler inputs
HANDLERS = (main.generate, main.generate_live)


def engine_choices_call(handler) -> ast.Call:
    """The one `EngineChoices(...)` call in the handler's source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(handler)))
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "EngineChoices"
    ]
    assert len(calls) == 1, f"{handler.__name__} must build EngineChoices once, by keyword"
    return calls[0]


@pytest.mark.parametrize("handler", HANDLERS, ids=lambda h: h.__name__)
def test_every_engine_choice_is_set_from_an_explicitly_named_handler_input(handler) -> None:
    """Each field is passed by keyword, from the handler's parameter of the same name: no `locals()`, no `**`
    mapping, so renaming a local variable cannot change what reaches the engine."""
    call = engine_choices_call(handler)
    parameters = set(inspect.signature(handler).parameters)
    assert not call.args and all(k.arg is not None for k in call.keywords)  # no positional, no **mapping
    passed = {k.arg: k.value for k in call.keywords}
    assert set(passed) == {f.name for f in fields(EngineChoices)}
    for name, value in passed.items():
        assert isinstance(value, ast.Name) and value.id == name and name in parameters, name


def test_no_app_code_reads_its_own_locals() -> None:
    for path in APP_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in {"locals", "vars"}, f"{path.name}:{node.lineno}"


def test_engine_choices_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        EngineChoices("ISPA", 0.5, 6, 1e-3, 0, "default", "tiny")  # type: ignore[misc]


@pytest.mark.parametrize("handler", HANDLERS, ids=lambda h: h.__name__)
def test_each_input_reaches_the_engine_choice_of_its_name(handler, monkeypatch: pytest.MonkeyPatch) -> None:
    """Distinct values per input: a field fed from the wrong input (a swap) would show here."""
    seen = {}

    def capture(request, choices, owner_token, **inputs):
        seen.update(choices=choices, owner_token=owner_token, inputs=inputs)
        yield ()

    monkeypatch.setattr(main, "_generate", capture)
    names = [n for n in inspect.signature(handler).parameters if n != "request"]
    values = {name: f"value of {name}" for name in names}
    list(handler(**values, request=None))
    for field in fields(EngineChoices):
        assert getattr(seen["choices"], field.name) == values[field.name]
    assert seen["owner_token"] == values["owner_token"]
    assert seen["inputs"]["portrait"] == values["portrait"] and seen["inputs"]["prompt"] == values["prompt"]


def test_the_generation_events_are_found_in_the_demos_event_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ids the request guard protects from Gradio's cancel: exactly the two generation events."""
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    demo = main.build_demo()
    expected = {
        dependency(demo, api_name="generate")["id"],
        dependency(demo, fn_name="generate_live")["id"],
    }
    assert main.generation_event_ids(demo) == expected
    assert not hasattr(demo, "generation_fns")  # nothing is stored on the Gradio object
    # The page's hidden events, refused to clients that never loaded the page: the issue's seven among them,
    # none of the API's.
    ids, names = main.hidden_events(demo)
    issue_23 = {"generate_live", "push_live_audio", "open_live_feed", "close_live_feed", "end_session"}
    assert issue_23 | {"refresh_sizes", "issue_owner_token"} <= names
    for name in ("generate", "stop", "recalibrate"):
        assert dependency(demo, api_name=name)["id"] not in ids
