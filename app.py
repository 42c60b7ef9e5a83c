"""Entry point, locally (`python app.py`), as a Hugging Face Space (`app_file` in README.md), and on several
GPUs (`torchrun --standalone --nproc-per-node K app.py`, see `app.serve_on_ranks`).

`spaces` must be imported before torch on a ZeroGPU Space; elsewhere it is absent and nothing changes. The
server address comes from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT when they are set (Gradio reads them).
"""

import contextlib
import logging

with contextlib.suppress(ImportError):
    import spaces  # noqa: F401  (before torch, which `app.main` imports)

from app.main import build_demo, serve  # noqa: E402
from app.weights_on_start import start_weight_download  # noqa: E402
from avatars.liveavatar.distributed import launched_by_torchrun  # noqa: E402

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

if launched_by_torchrun():  # every rank runs this file: rank 0 serves, the others follow its runs
    from app.serve_on_ranks import serve_on_ranks

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    raise SystemExit(serve_on_ranks())

start_weight_download()  # on a Space or with ISPA_DOWNLOAD=1, with a GPU and weights missing: in the background
demo = build_demo()

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    serve(demo)
