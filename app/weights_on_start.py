"""LiveAvatar 14B's weights fetched while the app already serves the tiny model (issue 22, part 1).

On a Hugging Face Space (SPACE_ID set), or with ISPA_DOWNLOAD=1, on a machine with a GPU whose weights are not all
there, `start_weight_download()` starts `avatars.liveavatar.weights.background.BackgroundDownload` into
`weights_dir()` (`/data` with persistent storage, else the Hugging Face cache). The banner and the model choice
read `download_note()` until the weights are complete and checked; then the 14B model becomes selectable. A failed
download is said in the banner; its partial files stay, and the next start continues them.
"""

from __future__ import annotations

import logging

import torch

from app.gpu import ON_ZERO_GPU
from avatars.liveavatar.loading import available_models, downloads_on_start, weights_dir
from avatars.liveavatar.weights.background import BackgroundDownload, DownloadStatus

logger = logging.getLogger(__name__)

_download: list[BackgroundDownload] = []  # the process's one download, once started


def gpu_present() -> bool:
    """Whether this machine has a GPU for the 14B model (on ZeroGPU one is lent per run)."""
    return ON_ZERO_GPU or torch.cuda.is_available()


def start_weight_download(**options: object) -> BackgroundDownload | None:
    """Start fetching the 14B weights in the background when asked (a Space, or ISPA_DOWNLOAD=1), on a GPU
    machine, with weights missing; None when none is needed. `options` go to `BackgroundDownload`."""
    if _download or not downloads_on_start() or not gpu_present():
        return current_download()
    if available_models(gpu=True)["14b"] is None:
        return None  # all there and sound
    root = weights_dir()
    logger.info("LiveAvatar 14B weights missing: downloading them into %s in the background", root)
    _download.append(BackgroundDownload(root, **options).start())  # type: ignore[arg-type]
    return _download[0]


def current_download() -> BackgroundDownload | None:
    return _download[0] if _download else None


def download_status() -> DownloadStatus | None:
    download = current_download()
    return download.status() if download else None


def download_note() -> str | None:
    """Why the 14B model is not selectable yet while a download runs or after it failed; None otherwise."""
    status = download_status()
    if status is None or status.state == "ready":
        return None
    if status.state == "failed":
        return f"LiveAvatar 14B weights: {status.describe()}. Restart the app to continue the download"
    return f"LiveAvatar 14B weights: {status.describe()}; the model becomes selectable once they are complete"


def download_running() -> bool:
    status = download_status()
    return status is not None and status.state not in ("ready", "failed")


def forget_download() -> None:
    """Drop the process's download (tests)."""
    _download.clear()
