"""Entry point, locally (`python app.py`) and as a Hugging Face Space (`app_file` in README.md).

`spaces` must be imported before torch on a ZeroGPU Space; elsewhere it is absent and nothing changes. The
server address comes from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT when they are set (Gradio reads them).
"""

import contextlib
import logging

with contextlib.suppress(ImportError):
    import spaces  # noqa: F401  (before torch, which `app.main` imports)

from app.main import build_demo, serve  # noqa: E402

demo = build_demo()

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(demo)
