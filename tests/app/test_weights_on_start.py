"""The 14B weights fetched in the background on a Space (tests/fixtures/fake_hub serves them on 127.0.0.1), the GPU
injected: the banner's progress, the model selectable once they are checked, a refusal said in the banner while the
tiny model serves on, and a restart that continues a cut-off file."""

import threading

import gradio as gr
import pytest

from app import main, models, weights_on_start
from avatars.liveavatar.weights.background import BackgroundDownload
from avatars.liveavatar.weights.fetch import PARTIAL_FOLDER, DownloadPlan, RemoteFile
from avatars.liveavatar.weights.hub import SOURCES, WeightPaths
from tests.fixtures.fake_hub import FakeHub, serving, tiny_repos
from tests.fixtures.tiny_checkpoints import write_tiny_weights

SHARD = "diffusion_pytorch_model-00003-of-00004.safetensors"


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    return tiny_repos(tmp_path_factory.mktemp("hub"), {})


def _forget():
    weights_on_start.forget_download()
    models._models_found.cache_clear()


@pytest.fixture
def space(repos, tmp_path, monkeypatch):
    """A Space with a GPU (said so), no weights yet in $ISPA_WEIGHTS, and the Hub on 127.0.0.1."""
    monkeypatch.setenv("SPACE_ID", "someone/ispa-avatar")
    monkeypatch.setenv("ISPA_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(weights_on_start, "gpu_present", lambda: True)
    _forget()
    with serving(FakeHub({repo: dict(files) for repo, files in repos.items()})) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        yield hub
    _forget()


def _news():
    banner, model, timer = main.weights_news()
    return banner, model, timer


def test_the_weights_arrive_and_the_14b_model_becomes_selectable(space, tmp_path):
    assert "weights not found" in models.model_availability()["14b"]
    download = weights_on_start.start_weight_download(retry_wait=0)
    assert download is not None and download.root == tmp_path / "weights"
    assert weights_on_start.start_weight_download() is download  # one per process
    assert download.wait(30)
    assert download.status().state == "ready", download.status().error
    assert models.model_availability()["14b"] is None
    banner, model, timer = _news()
    assert model.interactive is True and model.info is None
    assert "Running without the real model" not in banner.value
    assert timer.active is False
    assert WeightPaths.under(tmp_path / "weights").lora_file.is_file()


def test_a_refused_download_is_said_in_the_banner_and_the_tiny_model_serves_on(space):
    space.refuse["Wan-AI/Wan2.2-S2V-14B"] = 403
    download = weights_on_start.start_weight_download(retry_wait=0)
    assert download.wait(30) and download.status().state == "failed"
    banner, model, timer = _news()
    host = space.endpoint.removeprefix("http://")
    assert (
        f"Wan-AI/Wan2.2-S2V-14B is gated or your token may not read it (HTTP 403): accept its terms on its page at {host}"
        in banner.value
    )
    assert "Restart the app" in banner.value
    assert "Repository Not Found" not in banner.value
    assert model.interactive is False and "HTTP 403" in model.info
    assert timer.active is False
    assert models.default_model() == "tiny"


def test_a_short_disk_is_said_before_any_byte(space):
    download = weights_on_start.start_weight_download(free_bytes=lambda path: 0, retry_wait=0)
    assert download.wait(30)
    assert "not enough disk space" in _news()[0].value
    assert space.resolve_gets() == []


def test_a_restart_continues_a_file_cut_off_before(space, tmp_path):
    space.cut[SHARD] = (500, 5)
    first = weights_on_start.start_weight_download(attempts=2, retry_wait=0)
    assert first.wait(30) and "kept failing" in first.status().error
    partials = list((tmp_path / "weights" / "Wan2.2-S2V-14B" / PARTIAL_FOLDER).glob("*.part"))
    assert [p.stat().st_size for p in partials] == [500]
    _forget()  # the app restarts
    space.cut.clear()
    space.requests.clear()
    again = weights_on_start.start_weight_download(retry_wait=0)
    assert again.wait(30) and again.status().state == "ready"
    assert space.resolve_gets(SHARD) == ["bytes=500-"]


def test_progress_in_the_banner_while_the_weights_come(space, monkeypatch):
    """A download held half way (its clock and byte counts given): GB done of total, rate, time left."""
    release, halfway = threading.Event(), threading.Event()
    clock = iter([0.0, 100.0])

    def held_download(root, *, on_plan, on_bytes, **options):
        whole = RemoteFile(SOURCES[0], "commit", "model.safetensors", 60 * 10**9, "blob")
        on_plan(DownloadPlan(root, (whole,), done_bytes=10 * 10**9))
        on_bytes(20 * 10**9)  # 20 GB in 100 s: 200 MB/s, 30 GB left: 150 s
        halfway.set()
        release.wait(10)

    monkeypatch.setattr(weights_on_start, "BackgroundDownload", lambda root, **o: BackgroundDownload(
        root, download=held_download, clock=lambda: next(clock), **o))  # fmt: skip
    download = weights_on_start.start_weight_download()
    assert halfway.wait(10)
    banner, model, timer = _news()
    assert "downloading: 30.0 of 60.0 GB, 200 MB/s, about 2 min left" in banner.value
    assert model.interactive is False and timer.active is True
    demo = main.build_demo()
    assert any(isinstance(block, gr.Timer) for block in demo.blocks.values())  # the banner follows it
    release.set()
    assert download.wait(10)


@pytest.mark.parametrize("setting", ["no request", "no GPU", "weights present"])
def test_no_download_when_not_asked_without_a_gpu_or_with_the_weights(space, monkeypatch, tmp_path, setting):
    if setting == "no request":
        monkeypatch.delenv("SPACE_ID")
    elif setting == "no GPU":
        monkeypatch.setattr(weights_on_start, "gpu_present", lambda: False)
    else:
        write_tiny_weights(tmp_path / "weights")
    assert weights_on_start.start_weight_download() is None
    assert space.requests == []
