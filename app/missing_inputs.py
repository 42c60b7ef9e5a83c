"""A call that sends fewer input values than an endpoint takes is answered in the app's words.

Gradio checks the number of values before anything else (`Blocks.validate_inputs`) and raises a ValueError
written for developers of JavaScript event handlers; with `show_error=False` an API client sees an empty
message. Here the same check names the endpoint, the missing inputs and the order the endpoint takes them in.
The check is replaced on the app's instance (the app builds a plain `gr.Blocks`).
"""

from __future__ import annotations

import inspect
from typing import Any

import gradio as gr


def name_missing_inputs(demo: gr.Blocks) -> None:
    """Make `demo` refuse a call with missing input values by naming them."""
    demo.validate_inputs = _validate_inputs  # type: ignore[method-assign]


def input_names(fn: Any, count: int) -> list[str]:
    """The handler's parameter names for its `count` inputs (Gradio's own `request` is not an input)."""
    try:
        names = [n for n in inspect.signature(fn).parameters if n != "request"]
    except (TypeError, ValueError):
        names = []
    return names[:count] if len(names) >= count else [f"input {i + 1}" for i in range(count)]


def _validate_inputs(block_fn: Any, inputs: list[Any]) -> None:
    wanted = len(block_fn.inputs)
    if len(inputs) >= wanted:
        return
    names = input_names(block_fn.fn, wanted)
    endpoint = f"/{block_fn.api_name}" if isinstance(block_fn.api_name, str) else "this event"
    raise gr.Error(
        f"{endpoint} takes {wanted} input values and got {len(inputs)}; missing: {', '.join(names[len(inputs) :])}. "
        f"The inputs, in order: {', '.join(names)}."
    )
