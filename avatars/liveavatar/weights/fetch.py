"""Downloading LiveAvatar's weights from the Hub: resumable across runs, checked by size, every failure in our words.

`huggingface_hub` lists each repository (`HfApi.model_info` with file sizes), builds the URLs, headers and token,
and maps HTTP errors to its exception classes. The bytes are fetched here rather than by `hf_hub_download`,
because that (2.4) writes each file to a temporary name unique to the process and deletes it on failure: a file cut
off in one run starts from byte 0 in the next, and a killed run leaves its partial file behind forever. Here each
file grows in `<repo folder>/.cache/ispa-partial/<path>.<blob id>.part`, continues from its last byte with an HTTP
Range request (within a run after a dropped connection, and in the next run), and is renamed into place only at its
full size, so a partial file never counts as done. Partial files of another revision, and the `.incomplete` files
`huggingface_hub` leaves behind, are removed before a download starts.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import HfApi, constants, get_session, hf_hub_url
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import build_hf_headers, filter_repo_objects, hf_raise_for_status

from avatars.liveavatar.weights.errors import CheckpointError
from avatars.liveavatar.weights.hub import SOURCES, WeightPaths, WeightSource, resolve_weights

logger = logging.getLogger(__name__)

PARTIAL_FOLDER = Path(".cache") / "ispa-partial"
HF_LEFTOVERS = (
    Path(".cache") / "huggingface" / "download"
)  # where hf_hub_download(local_dir=...) left `.incomplete`s
ATTEMPTS = 5  # tries in a row that bring no new byte before a file is given up (within one run)
RETRY_WAIT_SECONDS = 2.0
READ_TIMEOUT_SECONDS = 60.0
GB = 1e9


class DownloadError(RuntimeError):
    """A download that cannot go on; the message says why in our words and what to do."""


@dataclass(frozen=True)
class RemoteFile:
    """One file to have under `root`: where it comes from, its size and its blob id (which names its partial file)."""

    source: WeightSource
    revision: str
    path: str
    size: int
    blob_id: str

    def target(self, root: Path) -> Path:
        return root / self.source.folder_name / self.path

    def partial(self, root: Path) -> Path:
        return root / self.source.folder_name / PARTIAL_FOLDER / f"{self.path}.{self.blob_id[:16]}.part"


@dataclass(frozen=True)
class DownloadPlan:
    """Every file the weights need, and how many bytes are already on disk (whole files and partial ones)."""

    root: Path
    files: tuple[RemoteFile, ...]
    done_bytes: int

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def left_bytes(self) -> int:
        return self.total_bytes - self.done_bytes


def hub_endpoint() -> str:
    """The Hub's address: $HF_ENDPOINT read now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_ENDPOINT", constants.ENDPOINT).rstrip("/")


def plan_download(root: str | Path, *, endpoint: str | None = None, token: str | None = None) -> DownloadPlan:
    """Ask the Hub which files the weights need and their sizes; remove partial files no planned file will reuse."""
    root, endpoint = Path(root), endpoint or hub_endpoint()
    api = HfApi(endpoint=endpoint, token=token)
    files: list[RemoteFile] = []
    for source in SOURCES:
        try:
            info = api.model_info(source.repo_id, files_metadata=True)
        except (HfHubHTTPError, httpx2.TransportError) as err:
            raise DownloadError(explain(err, source.repo_id, endpoint)) from None
        wanted = filter_repo_objects(
            info.siblings or [], allow_patterns=list(source.allow_patterns), key=_name
        )
        for sibling in wanted:
            blob = sibling.lfs.sha256 if sibling.lfs else sibling.blob_id
            if sibling.size is None or blob is None:
                raise DownloadError(f"the Hub did not give the size of {source.repo_id}/{sibling.rfilename}")
            files.append(RemoteFile(source, str(info.sha), sibling.rfilename, sibling.size, blob))
    _remove_stale_partials(root, files)
    return DownloadPlan(root, tuple(files), sum(_bytes_on_disk(f, root) for f in files))


def _name(sibling: object) -> str:
    return sibling.rfilename  # type: ignore[attr-defined]


def _bytes_on_disk(file: RemoteFile, root: Path) -> int:
    target, partial = file.target(root), file.partial(root)
    if target.is_file() and target.stat().st_size == file.size:
        return file.size
    return min(partial.stat().st_size, file.size) if partial.is_file() else 0


def _remove_stale_partials(root: Path, files: list[RemoteFile]) -> None:
    """Partial files of a killed run are kept when a planned file continues them, removed otherwise (another
    revision); `huggingface_hub`'s own `.incomplete` files can never be continued, so they go."""
    keep = {f.partial(root) for f in files}
    for source in SOURCES:
        folder = root / source.folder_name
        for leftover in [
            *(folder / PARTIAL_FOLDER).rglob("*.part"),
            *(folder / HF_LEFTOVERS).rglob("*.incomplete"),
        ]:
            if leftover not in keep:
                logger.info("removing a partial file no download will continue: %s", leftover)
                leftover.unlink(missing_ok=True)


def free_disk_bytes(path: Path) -> int:
    """Free bytes on the disk that holds `path` (its nearest existing folder)."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check_disk(plan: DownloadPlan, free_bytes: Callable[[Path], int] = free_disk_bytes) -> None:
    """A DownloadError saying how much is missing when the disk cannot hold what is left to fetch."""
    free = free_bytes(plan.root)
    if free < plan.left_bytes:
        raise DownloadError(
            f"not enough disk space in {plan.root}: {_gb(plan.left_bytes)} left to fetch, {_gb(free)} free; "
            f"free {_gb(plan.left_bytes - free)} more (or point ISPA_WEIGHTS at a larger disk) and start again"
        )


def fetch_file(
    file: RemoteFile,
    root: Path,
    on_bytes: Callable[[int], None],
    *,
    endpoint: str | None = None,
    token: str | None = None,
    attempts: int = ATTEMPTS,
    retry_wait: float = RETRY_WAIT_SECONDS,
) -> None:
    """Bring one file to its full size, continuing its partial file; a dropped connection or a short body is
    retried from the bytes already written, `attempts` times in a row without progress at most."""
    target, partial = file.target(root), file.partial(root)
    if target.is_file() and target.stat().st_size == file.size:
        return
    endpoint = endpoint or hub_endpoint()
    url = hf_hub_url(file.source.repo_id, file.path, revision=file.revision, endpoint=endpoint)
    partial.parent.mkdir(parents=True, exist_ok=True)
    if partial.is_file() and partial.stat().st_size > file.size:
        partial.unlink()  # longer than the file: not a prefix of it
    failures = 0
    while not (partial.is_file() and partial.stat().st_size == file.size):
        before = partial.stat().st_size if partial.is_file() else 0
        try:
            _get_rest(url, partial, before, file.size, on_bytes, token)
        except (httpx2.TransportError, _ShortBody, _Transient) as err:
            after = partial.stat().st_size if partial.is_file() else 0
            failures = 0 if after > before else failures + 1
            if failures >= attempts:
                raise DownloadError(
                    f"the connection to {_host(endpoint)} kept failing while fetching {file.source.repo_id}/{file.path} "
                    f"({_reason(err)}); {_gb(after)} of {_gb(file.size)} of it are kept, run again to continue"
                ) from None
            logger.warning("%s: %s; continuing from byte %d", file.path, _reason(err), after)
            time.sleep(retry_wait)
        except HfHubHTTPError as err:
            raise DownloadError(explain(err, file.source.repo_id, endpoint, file.path)) from None
        except OSError as err:
            raise DownloadError(_disk_message(err, file)) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, target)


class _ShortBody(Exception):
    """The server ended the body before the file's size (or sent more)."""


class _Transient(Exception):
    """An HTTP status worth asking again for (busy or failing server)."""


TRANSIENT_STATUS = (429, 500, 502, 503, 504)


def _get_rest(
    url: str, partial: Path, offset: int, size: int, on_bytes: Callable[[int], None], token: str | None
):
    """GET the file from byte `offset` on, appended to `partial`."""
    headers = build_hf_headers(token=token)
    if offset:
        headers["Range"] = f"bytes={offset}-"
    timeout = httpx2.Timeout(READ_TIMEOUT_SECONDS, connect=10.0)
    with get_session().stream("GET", url, headers=headers, timeout=timeout) as response:
        if response.status_code in TRANSIENT_STATUS:
            raise _Transient(f"HTTP {response.status_code}")
        if response.status_code >= 400:
            response.read()
            hf_raise_for_status(response)
        if offset and response.status_code != 206:  # the server ignored the Range: start over
            offset = 0
        written = offset
        with partial.open("r+b" if offset else "wb") as out:
            if offset:
                out.seek(offset)
                out.truncate()
            for chunk in response.iter_bytes():  # as received: a chunk buffer would lose bytes on a cut
                out.write(chunk)
                written += len(chunk)
                on_bytes(len(chunk))
    if written != size:
        raise _ShortBody(f"the server sent {written} of {size} bytes")


def download_weights(
    root: str | Path,
    *,
    on_plan: Callable[[DownloadPlan], None] = lambda plan: None,
    on_bytes: Callable[[int], None] = lambda n: None,
    endpoint: str | None = None,
    token: str | None = None,
    free_bytes: Callable[[Path], int] = free_disk_bytes,
    attempts: int = ATTEMPTS,
    retry_wait: float = RETRY_WAIT_SECONDS,
) -> WeightPaths:
    """Fetch whatever is missing of the three repositories into `root` (resumable), then check every file.

    `on_plan` hears the plan before any byte is fetched (after the disk check), `on_bytes` each chunk written.
    Raises DownloadError, in our words, for anything that stops it.
    """
    root = Path(root)
    plan = plan_download(root, endpoint=endpoint, token=token)
    check_disk(plan, free_bytes)
    on_plan(plan)
    for file in plan.files:
        logger.debug("fetching %s/%s (%s)", file.source.repo_id, file.path, _gb(file.size))
        fetch_file(
            file, root, on_bytes, endpoint=endpoint, token=token, attempts=attempts, retry_wait=retry_wait
        )
    try:
        return resolve_weights(root)
    except CheckpointError as err:
        raise DownloadError(f"the downloaded files do not check out: {err}") from None


def explain(err: Exception, repo_id: str, endpoint: str, path: str | None = None) -> str:
    """A Hub failure in our words. A 401 is said as what it is (the client calls it "Repository Not Found")."""
    what = f"{repo_id}/{path}" if path else repo_id
    if isinstance(err, httpx2.TransportError):
        return (
            f"cannot reach the Hub at {_host(endpoint)} ({_reason(err)}); check the network and start again"
        )
    status = (
        err.response.status_code if isinstance(err, HfHubHTTPError) and err.response is not None else None
    )
    if status == 401:
        return (
            f"the Hub refused {repo_id} without a valid token (HTTP 401): log in with `hf auth login` or set "
            f"HF_TOKEN (on a Space: a secret named HF_TOKEN), then start again"
        )
    if status == 403:
        return (
            f"{repo_id} is gated or your token may not read it (HTTP 403): accept its terms on its page at "
            f"{_host(endpoint)} with the account of your token, then start again"
        )
    if status == 404:
        return f"{what} was not found on {_host(endpoint)} (HTTP 404): the repository or file may have moved"
    if status is not None:
        return f"the Hub answered HTTP {status} for {what}; try again later (the download continues where it stopped)"
    return f"the Hub request for {what} failed ({_reason(err)})"


def _disk_message(err: OSError, file: RemoteFile) -> str:
    what = f"{file.source.repo_id}/{file.path}"
    if err.errno == errno.ENOSPC:
        return f"the disk filled up while writing {what}; free some space and start again (fetched bytes are kept)"
    return f"cannot write {what}: {err.strerror or err}"


def _host(endpoint: str) -> str:
    """The endpoint's host: messages reach the browser, where URLs and paths are blanked out."""
    return urlsplit(endpoint).netloc or endpoint


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _gb(n: int | float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"
