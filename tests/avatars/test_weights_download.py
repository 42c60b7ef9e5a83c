"""Downloading the weights with the real huggingface_hub client from a Hub on 127.0.0.1 (tests/fixtures/fake_hub):
the files each repo is asked for, a cut connection resumed within a run and in the next one, the Hub's refusals
and a short disk said in our words, with a non-zero exit and no traceback from the command line."""

import logging
import os

import pytest

from avatars.liveavatar import download
from avatars.liveavatar.weights import fetch
from avatars.liveavatar.weights.hub import SOURCES, WeightPaths
from tests.fixtures.fake_hub import FakeHub, serving, tiny_repos

SHARD = "diffusion_pytorch_model-00002-of-00004.safetensors"
NOT_WANTED = {  # files of the real repos we never fetch
    "Wan-AI/Wan2.2-S2V-14B": {"Wan2.1_VAE.pth": b"vae" * 50, "README.md": b"# S2V"},
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": {"transformer/diffusion_pytorch_model.safetensors": b"x" * 99},
}


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    return tiny_repos(tmp_path_factory.mktemp("hub"), NOT_WANTED)


@pytest.fixture
def hub(repos, monkeypatch):
    with serving(FakeHub({repo: dict(files) for repo, files in repos.items()})) as served:
        monkeypatch.setenv("HF_ENDPOINT", served.endpoint)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield served


def _files_under(root):
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_a_full_download_fetches_the_wanted_files_and_checks_them(hub, tmp_path):
    seen = []
    paths = fetch.download_weights(tmp_path, on_plan=seen.append, retry_wait=0)
    assert paths == WeightPaths.under(tmp_path)
    wanted = {
        f"{s.folder_name}/{p}"
        for s in SOURCES
        for p in hub.repos[s.repo_id]
        if p not in NOT_WANTED.get(s.repo_id, {})
    }
    assert _files_under(tmp_path) == wanted  # nothing else, no partial file left
    for source in SOURCES:
        for path, data in hub.repos[source.repo_id].items():
            if f"{source.folder_name}/{path}" in wanted:
                assert (tmp_path / source.folder_name / path).read_bytes() == data
    (plan,) = seen
    assert plan.done_bytes == 0 and plan.total_bytes == sum((tmp_path / f).stat().st_size for f in wanted)
    assert all(rng is None for rng in hub.resolve_gets())
    # a second run asks for the list only: every file is there at its size
    hub.requests.clear()
    again = []
    fetch.download_weights(tmp_path, on_plan=again.append, retry_wait=0)
    assert hub.resolve_gets() == [] and again[0].left_bytes == 0


def test_a_reset_and_a_cut_mid_file_are_retried_from_the_last_byte(hub, tmp_path):
    hub.reset[SHARD] = 1
    hub.cut[SHARD] = (700, 1)
    fetch.download_weights(tmp_path, retry_wait=0)
    assert hub.resolve_gets(SHARD) == [None, None, "bytes=700-"]
    data = hub.repos["Wan-AI/Wan2.2-S2V-14B"][SHARD]
    assert (tmp_path / "Wan2.2-S2V-14B" / SHARD).read_bytes() == data


def test_files_the_hub_sends_to_its_cdn_arrive_whole_resume_there_and_the_token_stays_home(hub, tmp_path):
    """The Hub answers a weights file with a redirect to a CDN on another host; a cut there resumes there."""
    hub.redirect_lfs = True
    hub.cut[SHARD] = (700, 1)
    fetch.download_weights(tmp_path, token="hf_not_for_the_cdn", retry_wait=0)
    for source in SOURCES:
        for path, data in hub.repos[source.repo_id].items():
            if path not in NOT_WANTED.get(source.repo_id, {}):
                assert (tmp_path / source.folder_name / path).read_bytes() == data
    cdn_gets = [
        (path, rng) for method, path, rng in hub.requests if method == "GET" and path.startswith("/cdn/")
    ]
    assert [rng for path, rng in cdn_gets if path.endswith(SHARD)] == [None, "bytes=700-"]
    assert len(cdn_gets) >= len([p for p in hub.repos["Wan-AI/Wan2.2-S2V-14B"] if p.endswith(".safetensors")])
    assert {auth for path, auth in hub.auth if "/resolve/" in path} == {"Bearer hf_not_for_the_cdn"}
    assert {auth for path, auth in hub.auth if path.startswith("/cdn/")} == {None}


def test_a_file_cut_off_in_one_run_resumes_from_its_bytes_in_the_next(hub, tmp_path):
    hub.cut[SHARD] = (900, 3)  # more failures in a row than the run allows
    with pytest.raises(fetch.DownloadError, match="kept failing .* run again to continue") as err:
        fetch.download_weights(tmp_path, attempts=2, retry_wait=0)
    assert "Traceback" not in str(err.value)
    target = tmp_path / "Wan2.2-S2V-14B" / SHARD
    assert not target.exists()  # a partial file never counts as done
    (partial,) = (tmp_path / "Wan2.2-S2V-14B" / fetch.PARTIAL_FOLDER).glob("*.part")
    assert partial.stat().st_size == 900
    with pytest.raises(Exception, match="incomplete"):
        fetch.resolve_weights(tmp_path)
    hub.cut.clear()
    hub.requests.clear()
    plans = []
    fetch.download_weights(tmp_path, on_plan=plans.append, retry_wait=0)
    ranges = hub.resolve_gets(SHARD)
    assert ranges == ["bytes=900-"]  # continued, not from byte 0
    assert target.read_bytes() == hub.repos["Wan-AI/Wan2.2-S2V-14B"][SHARD]
    assert plans[0].done_bytes > 900 and not partial.exists()


def test_partial_files_no_download_continues_are_removed(hub, tmp_path):
    folder = tmp_path / "Wan2.2-S2V-14B"
    stale = folder / fetch.PARTIAL_FOLDER / f"{SHARD}.{'f' * 16}.part"  # another revision's blob
    hf_leftover = folder / fetch.HF_LEFTOVERS / "abc.1234.incomplete"  # a killed hf_hub_download's
    for leftover in (stale, hf_leftover):
        leftover.parent.mkdir(parents=True, exist_ok=True)
        leftover.write_bytes(b"\0" * 500)
    fetch.plan_download(tmp_path)
    assert not stale.exists() and not hf_leftover.exists()


def test_the_disk_check_refuses_before_any_byte_and_says_what_is_missing(hub, tmp_path):
    with pytest.raises(fetch.DownloadError) as err:
        fetch.download_weights(tmp_path, free_bytes=lambda path: 1000, retry_wait=0)
    plan = fetch.plan_download(tmp_path)
    message = str(err.value)
    assert "not enough disk space" in message
    assert f"{(plan.left_bytes - 1000) / 1e6:.1f} MB more" in message
    assert hub.resolve_gets() == []


def test_a_full_disk_mid_file_is_said_plainly(hub, tmp_path):
    """The shard's partial file is /dev/full, where every write fails with "no space left on device"."""
    plan = fetch.plan_download(tmp_path)
    (shard,) = [f for f in plan.files if f.path == SHARD]
    shard.partial(tmp_path).parent.mkdir(parents=True)
    shard.partial(tmp_path).symlink_to("/dev/full")
    with pytest.raises(fetch.DownloadError) as err:
        fetch.download_weights(tmp_path, retry_wait=0)
    assert str(err.value) == (
        f"the disk filled up while writing Wan-AI/Wan2.2-S2V-14B/{SHARD}; free some space and start again "
        "(fetched bytes are kept)"
    )


@pytest.mark.parametrize(
    ("status", "words"),
    [(401, "without a valid token (HTTP 401)"), (403, "is gated"), (404, "was not found")],
)
def test_refusals_exit_non_zero_in_our_words(hub, tmp_path, capsys, status, words):
    hub.refuse["Quark-Vision/Live-Avatar"] = status
    code = download.main(["--root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code != 0
    assert words in err and "Quark-Vision/Live-Avatar" in err
    assert "Traceback" not in err and "Repository Not Found" not in err
    assert len(err.strip().splitlines()) <= 3


def test_a_server_that_is_down_is_said_plainly(monkeypatch, tmp_path, capsys):
    with serving(FakeHub({})) as gone:
        endpoint = gone.endpoint
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    assert download.main(["--root", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert f"cannot reach the Hub at {endpoint.removeprefix('http://')} (ConnectError" in err
    assert "Traceback" not in err


def test_the_command_line_downloads_without_request_logs_at_info(hub, tmp_path, capsys):
    assert download.main(["--root", str(tmp_path)]) == 0
    assert "weights ready" in capsys.readouterr().out
    assert os.path.isfile(WeightPaths.under(tmp_path).lora_file)
    for name in ("httpx", "httpx2", "huggingface_hub"):
        assert logging.getLogger(name).getEffectiveLevel() >= logging.WARNING
