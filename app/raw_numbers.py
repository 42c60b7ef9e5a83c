"""The engine settings reach the app's own check as sent, not as Gradio's number components would make them.

Gradio's `Slider` and `Number` preprocessing runs before the handler: it refuses a value outside the slider's
range with its own wording that names no field ("Value 5 is less than minimum value 6."), rounds a seed of 1.5
to 2 without a word, and fails on 'abc' or None with an exception that a server with `show_error=False` turns
into an empty message. Passing the payload through unchanged leaves every one of those cases to
`app.validation.validate_settings`, which names the field and the values it allows. As in
`app.portrait_input`, the preprocessing is replaced on the instance: subclassing a Gradio component would make
Gradio write a `.pyi` stub beside this file at import time.
"""

from __future__ import annotations

from typing import Any

import gradio as gr


def pass_raw(*components: gr.Slider | gr.Number) -> None:
    """Hand these components' values to the handler exactly as the client sent them."""
    for component in components:
        # A patch, not `validator=`: Gradio runs a listener's validator on the already preprocessed values.
        component.preprocess = _unchanged  # type: ignore[method-assign]


def _unchanged(payload: Any) -> Any:
    return payload
