"""What Gradio refuses before a handler runs, answered in the app's words: too few input values, or a file field
that names a file on the server.

Gradio checks the number of values before anything else (`Blocks.validate_inputs`) and raises a ValueError
written for developers of JavaScript event handlers; with `show_error=False` an API client sees an empty
message. Here the same check names the endpoint, the missing inputs and the order the endpoint takes them in;
trailing inputs whose handler parameter has a default may be left out (a client written before an optional input
was added keeps working), and take that default. Next, Gradio moves each file of the call into its cache and
refuses one that was not uploaded (a path on the server), again with an empty message for the client; here such a
field is refused first, naming the field and never the path. The check is replaced on the app's instance (the app
builds a plain `gr.Blocks`).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder, is_in_or_equal


def name_missing_inputs(demo: gr.Blocks) -> None:
    """Make `demo` refuse a call with missing input values by naming them."""
    # A patch, not `validator=`: Gradio counts the values (this method) before it calls a listener's validator.
    demo.validate_inputs = _validate_inputs  # type: ignore[method-assign]


def input_parameters(fn: Any, count: int) -> list[inspect.Parameter | None]:
    """The handler's parameters for its `count` inputs (Gradio's own `request` is not an input); None where the
    handler's signature cannot be read."""
    try:
        parameters = [p for name, p in inspect.signature(fn).parameters.items() if name != "request"]
    except (TypeError, ValueError):
        parameters = []
    return parameters[:count] if len(parameters) >= count else [None] * count


def _validate_inputs(block_fn: Any, inputs: list[Any]) -> None:
    wanted = len(block_fn.inputs)
    parameters = input_parameters(block_fn.fn, wanted)
    _refuse_server_files(parameters, inputs)
    if len(inputs) >= wanted:
        return
    missing = parameters[len(inputs) :]
    if all(p is not None and p.default is not inspect.Parameter.empty for p in missing):
        # Gradio preprocesses this same list next, so the defaults stand in for the values left out.
        inputs.extend(p.default for p in missing)
        return
    names = [p.name if p is not None else f"input {i + 1}" for i, p in enumerate(parameters)]
    endpoint = f"/{block_fn.api_name}" if isinstance(block_fn.api_name, str) else "this event"
    raise gr.Error(
        f"{endpoint} takes {wanted} input values and got {len(inputs)}; missing: {', '.join(names[len(inputs) :])}. "
        f"The inputs, in order: {', '.join(names)}."
    )


def _refuse_server_files(parameters: list[inspect.Parameter | None], inputs: list[Any]) -> None:
    """A file value (Gradio's FileData: a dict with a `path`) must lie in Gradio's upload folder."""
    uploads = Path(get_upload_folder()).resolve()
    for i, value in enumerate(inputs):
        if not (isinstance(value, dict) and isinstance(value.get("path"), str)):
            continue
        path = value["path"]
        if path.startswith(("http://", "https://")) or is_in_or_equal(Path(path).resolve(), uploads):
            continue
        parameter = parameters[i] if i < len(parameters) else None
        name = parameter.name if parameter is not None else f"input {i + 1}"
        raise gr.Error(
            f"The {name} field names a file on the server, which is not accepted: upload the file instead "
            "(gradio_client's handle_file does, or POST it to /gradio_api/upload first)."
        )
