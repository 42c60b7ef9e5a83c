"""The portrait upload: Gradio's image input, with an unreadable file answered in plain words.

Gradio opens every uploaded image with PIL before the handler runs, so a file that is not an image fails
inside Gradio, and with `show_error=False` the user would only see a generic error. The component's own
preprocessing is wrapped on the instance: subclassing a Gradio component would make Gradio write a `.pyi`
stub next to this file at import time.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
from PIL import Image

from avatars.media.portrait import PORTRAIT_FORMATS


def portrait_image(**kwargs: Any) -> gr.Image:
    """`gr.Image(**kwargs)` whose preprocessing failures become a clear `gr.Error`."""
    image = gr.Image(**kwargs)
    preprocess = image.preprocess

    def checked_preprocess(payload: Any) -> Any:
        try:
            return preprocess(payload)
        except Image.DecompressionBombError:
            raise gr.Error("The portrait is far too large to open. Please upload a smaller image.") from None
        except (OSError, ValueError, SyntaxError):
            raise gr.Error(
                f"The portrait is not a readable image. Supported formats: {', '.join(PORTRAIT_FORMATS)}."
            ) from None

    # A patch, not `validator=`: Gradio preprocesses (opens the image) before a listener's validator runs.
    image.preprocess = checked_preprocess  # type: ignore[method-assign]
    return image
