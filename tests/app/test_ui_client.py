"""The app end to end through gradio_client, on the tiny test model: the `/generate` stream, its side panel
and final files checked against the engine's own per-chunk reports, compare mode, Stop and Recalibrate, and
clear errors for bad input with the server still serving afterwards."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import av
import httpx
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from app.models import model_availability
from app.panels import FULL_RING, FULL_RUN, FULL_UNBOUNDED, ISPA_RUN, THIS_RUN
from app.validation import MAX_SEED

PLAYER_A, PLAYER_B, PLOT, LAYERS, SUMMARY, DRIFT, STATUS, FILES, REPORT = range(9)
SMALL = "64×64 area"  # the tiny model's smaller size keeps every run short
FPS = 25
TINY_LAYERS = 4


@pytest.fixture
def client(app_url: str):
    c = Client(app_url, verbose=False, download_files=False)
    yield c
    c.close()


def speech_clip(examples_dir: Path, tmp_path: Path, seconds: float) -> Path:
    audio, rate = sf.read(examples_dir / "fashion_blogger.wav", dtype="float32")
    path = tmp_path / f"speech-{seconds}s.wav"
    sf.write(path, audio[: round(seconds * rate)], rate)
    return path


def submit(
    client: Client,
    portrait,
    audio,
    *,
    policy="ISPA",
    t_warm=6,
    text="",
    k=0.5,
    seed=1,
    model="tiny",
    size=SMALL,
    kv_format="bf16",
    refresh_sink=False,
    owner_token="",
    steps=4,
):
    return client.submit(
        handle_file(str(portrait)) if portrait else None,
        handle_file(str(audio)) if audio else None,
        text,
        "",
        policy,
        k,
        t_warm,
        seed,
        model,
        1e-3,
        size,
        kv_format,
        refresh_sink,
        owner_token,
        "Full",
        "ISPA",
        steps,
        api_name="/generate",
    )


def run(client: Client, portrait, audio, **kwargs) -> list[tuple]:
    """The run's step updates (see `is_step`)."""
    job = submit(client, portrait, audio, **kwargs)
    job.result()
    assert job.status().success
    return [out for out in job.outputs() if is_step(out)]


def is_step(out: tuple) -> bool:
    """A chunk's (or the end's) update, not the update of the plot's data alone that precedes a step whose plot
    properties change (`app.generation._outputs`)."""
    return isinstance(out[STATUS], str)


def plot_frame(update: dict) -> pd.DataFrame:
    """The plot's table; the plot arrives as an update that also sets its caption and colours."""
    value = update["value"]
    return pd.DataFrame(value["data"], columns=value["columns"])


UNIT_BYTES = {"B": 1.0, "kB": 1e3, "MB": 1e6, "GB": 1e9}


def plotted_bytes(update: dict, series: str) -> list[float]:
    """One value per chunk, in bytes, of a step series: the value each chunk's end steps to (the last point at
    each time), scaled back by the unit the y axis names."""
    unit = re.fullmatch(r"KV cache \((\w+)\)", update["y_title"])[1]
    df = plot_frame(update)
    part = df[df.series == series]
    return (part.groupby("t_seconds", sort=True).kv_cache.last() * UNIT_BYTES[unit]).tolist()


def local_cells(layer_map: str) -> int:
    states = re.findall(r'data-state="([LF])"', layer_map)
    assert len(states) == TINY_LAYERS
    return states.count("L")


def fetch(url: str, cookies: dict[str, str] | None = None) -> bytes:
    response = httpx.get(url, cookies=cookies, timeout=60)
    response.raise_for_status()
    return response.content


def video_frames(data: bytes) -> int:
    with av.open(io.BytesIO(data)) as container:
        return sum(1 for _ in container.decode(video=0))


def streamed(outputs: list[tuple], index: int) -> list[dict]:
    return [o[index] for o in outputs if isinstance(o[index], dict) and o[index].get("is_stream")]


def check_stream(outputs: list[tuple], index: int, frames: int, client: Client) -> str:
    """The player got a live stream whose playlist ends, and whose segments hold exactly the run's frames (read
    with the client's cookies: a session's streams are its client's only)."""
    values = streamed(outputs, index)
    assert values, "the player never received a stream segment"
    url = values[-1]["url"]
    assert {v["url"] for v in values} == {url}  # one stream per run, extended segment by segment
    playlist = fetch(url, client.cookies).decode()
    assert playlist.startswith("#EXTM3U") and playlist.rstrip().endswith("#EXT-X-ENDLIST")
    durations = [float(d) for d in re.findall(r"#EXTINF:([0-9.]+)", playlist)]
    # One segment per yielded file; Gradio may append one more holding the tail of its audio encoder.
    assert len(values) <= len(durations) <= len(values) + 1
    assert sum(durations[: len(values)]) == pytest.approx(frames / FPS, abs=0.05)
    assert video_frames(fetch(url.replace("playlist.m3u8", "playlist-file"), client.cookies)) == frames
    return url


def check_final_files(outputs: list[tuple], names: list[str]) -> dict:
    """The downloads are the run's mp4(s) with all its frames and a report.json equal to the JSON shown."""
    final = outputs[-1]
    report = final[REPORT]
    files = {f["orig_name"]: f for f in final[FILES]}
    assert set(files) == {*(f"avatar-{n.lower()}.mp4" for n in names), "report.json"}
    assert json.loads(fetch(files["report.json"]["url"])) == report
    for name in names:
        frames = round(report["runs"][name]["video_seconds"] * FPS)
        assert frames == sum(c["frames"] for c in report["runs"][name]["chunks"])
        assert video_frames(fetch(files[f"avatar-{name.lower()}.mp4"]["url"])) == frames
    return report


def test_ispa_run_streams_and_its_panels_follow_the_engine(
    client, examples_dir: Path, tmp_path: Path
) -> None:
    outputs = run(client, examples_dir / "fashion_blogger.jpg", speech_clip(examples_dir, tmp_path, 2.0))
    report = check_final_files(outputs, ["ISPA"])
    chunks = report["runs"]["ISPA"]["chunks"]
    assert len(chunks) >= 3
    assert report["is_test_model"] and "untrained" in report["model"]
    assert all("untrained" in o[STATUS] for o in outputs)
    # One update per chunk, then the final one; the updates between carry no new chunk: they hand over held-back
    # segments or count the hold down (app.playback).
    sizes = [len(plotted_bytes(o[PLOT], THIS_RUN)) for o in outputs[:-1]]
    fresh = [k for k, n in enumerate(sizes) if n != (sizes[k - 1] if k else 0)]
    assert [sizes[k] for k in fresh] == list(range(1, len(chunks) + 1))
    updates, outputs = outputs, [outputs[k] for k in fresh] + [outputs[-1]]

    # The plot grows by one step per chunk and carries the engine's own byte counts, in a unit that fits them.
    for i, out in enumerate(outputs[:-1]):
        mine, ring = plotted_bytes(out[PLOT], THIS_RUN), plotted_bytes(out[PLOT], FULL_RING)
        assert len(mine) == len(ring) == i + 1
        np.testing.assert_allclose(mine, [c["kv_bytes"] for c in chunks[: i + 1]], rtol=1e-12)
        np.testing.assert_allclose(ring, [c["kv_bytes_full_ring"] for c in chunks[: i + 1]], rtol=1e-12)

    # The absorb is marked on the plot where it happened, and layers are local from then on, not before.
    absorb = next(i for i, c in enumerate(chunks) if c["event"] == "absorbed")
    seconds_to_absorb = sum(c["frames"] for c in chunks[: absorb + 1]) / FPS
    marker = plot_frame(outputs[-1][PLOT]).query("series == 'absorbed'")
    assert marker.t_seconds.tolist() == pytest.approx([seconds_to_absorb] * 2)
    assert outputs[-1][PLOT]["caption"].startswith(f"green line: absorbed at {seconds_to_absorb:.2f} s")
    assert set(outputs[-1][PLOT]["color_map"]) == {THIS_RUN, FULL_RING, FULL_UNBOUNDED, "absorbed"}
    for i, out in enumerate(outputs[:-1]):
        assert local_cells(out[LAYERS]) == len(chunks[i]["l_layers"])
        assert (local_cells(out[LAYERS]) > 0) == (i >= absorb)
    assert local_cells(outputs[-1][LAYERS]) == round(0.5 * TINY_LAYERS)

    total_frames = round(report["runs"]["ISPA"]["video_seconds"] * FPS)
    check_stream(updates, PLAYER_A, total_frames, client)
    assert not streamed(updates, PLAYER_B)  # the second player is for compare mode only
    assert report["first_video_after_s"] > 0 and not report["stopped_early"]


def test_full_run_never_turns_a_layer_local(client, examples_dir: Path, tmp_path: Path) -> None:
    outputs = run(
        client, examples_dir / "fashion_blogger.jpg", speech_clip(examples_dir, tmp_path, 1.0), policy="Full"
    )
    report = check_final_files(outputs, ["Full"])
    chunks = report["runs"]["Full"]["chunks"]
    assert len(chunks) >= 2
    assert all(local_cells(o[LAYERS]) == 0 for o in outputs)
    assert all(c["l_layers"] == [] and c["event"] is None for c in chunks)
    assert set(plot_frame(outputs[-1][PLOT]).series) == {THIS_RUN, FULL_RING, FULL_UNBOUNDED}
    check_stream(outputs, PLAYER_A, round(report["runs"]["Full"]["video_seconds"] * FPS), client)


def test_the_kv_format_the_sink_refresh_and_the_steps_reach_the_engine(
    client, examples_dir: Path, tmp_path: Path
) -> None:
    speech = speech_clip(examples_dir, tmp_path, 1.0)
    portrait = examples_dir / "fashion_blogger.jpg"
    bf16 = run(client, portrait, speech, policy="Full")[-1][REPORT]
    fp8 = run(client, portrait, speech, policy="Full", kv_format="fp8", refresh_sink=True, steps=3)[-1][
        REPORT
    ]
    assert (bf16["settings"]["kv_format"], bf16["settings"]["refresh_sink"]) == ("bf16", False)
    assert (fp8["settings"]["kv_format"], fp8["settings"]["refresh_sink"]) == ("fp8", True)
    assert (bf16["settings"]["steps"], fp8["settings"]["steps"]) == (4, 3)
    bf16_kv = [c["kv_bytes"] for c in bf16["runs"]["Full"]["chunks"]]
    fp8_kv = [c["kv_bytes"] for c in fp8["runs"]["Full"]["chunks"]]
    assert len(bf16_kv) == len(fp8_kv) >= 2
    # The sink stays as computed; the history is stored in about a byte per value plus its scales.
    assert all(0 < f < b for f, b in zip(fp8_kv, bf16_kv, strict=True))


def test_compare_mode_streams_both_runs_and_their_drift(client, examples_dir: Path, tmp_path: Path) -> None:
    speech = speech_clip(examples_dir, tmp_path, 2.0)
    outputs = run(client, examples_dir / "fashion_blogger.jpg", speech, policy="Compare")
    report = check_final_files(outputs, ["Full", "ISPA"])
    full, ispa = report["runs"]["Full"]["chunks"], report["runs"]["ISPA"]["chunks"]
    assert len(full) == len(ispa) >= 3
    url_a = check_stream(outputs, PLAYER_A, round(report["runs"]["Full"]["video_seconds"] * FPS), client)
    url_b = check_stream(outputs, PLAYER_B, round(report["runs"]["ISPA"]["video_seconds"] * FPS), client)
    assert url_a != url_b

    # Both KV curves on one plot, one point per chunk each, at most one new chunk per update (an update without
    # one hands over held-back segments or counts the hold down): the Full run alone until its first video
    # segment is made (the ISPA run not started before), then the two in turn, ISPA first.
    counts = [(len(plotted_bytes(o[PLOT], FULL_RUN)), len(plotted_bytes(o[PLOT], ISPA_RUN))) for o in outputs]
    assert counts[-1] == (len(full), len(ispa))
    totals = [f + i for f, i in counts]
    assert all(b - a in (0, 1) for a, b in zip([0, *totals], totals, strict=False)) and totals[0] == 1
    first_video = next(k for k, o in enumerate(outputs) if "first video" in o[STATUS])
    assert all(i == 0 for _, i in counts[: first_video + 1])
    lead = counts[first_video][0]
    assert all(0 <= f - i <= lead for f, i in counts[first_video:])
    assert next(c for c in counts[first_video:] if c != counts[first_video]) == (lead, 1)

    # Full and ISPA are the same computation until ISPA's absorb, so their frames agree exactly up to that
    # block and differ after it.
    absorb = next(i for i, c in enumerate(ispa) if c["event"] == "absorbed")
    assert [d["index"] for d in report["drift"]] == [c["index"] for c in ispa]
    assert [d["identical"] for d in report["drift"]] == [i <= absorb for i in range(len(ispa))]
    assert all(d["psnr_db"] > 20 and 0 < d["ssim"] < 1 for d in report["drift"][absorb + 1 :])
    drift_rows = re.findall(r"<tr>(.*?)</tr>", outputs[-1][DRIFT].split("<tbody>", 1)[1])
    assert len(drift_rows) == len(ispa) and sum("identical" in row for row in drift_rows) == absorb + 1


def test_stop_and_recalibrate_reach_the_running_run(client, examples_dir: Path, tmp_path: Path) -> None:
    recalibrate_then_stop(client, examples_dir, tmp_path)


def recalibrate_then_stop(client: Client, examples_dir: Path, tmp_path: Path) -> None:
    """An ISPA run asked to recalibrate once it has absorbed, then stopped once it has recalibrated: it ends early
    with one recalibration, and Stop hands over what was generated."""
    speech = speech_clip(examples_dir, tmp_path, 5.0)  # about 11 chunks if nothing stops it
    token = "stop-test-owner-token-0123456789"
    job = submit(client, examples_dir / "fashion_blogger.jpg", speech, policy="ISPA", owner_token=token)
    stopped = None
    asked_to_recalibrate = False
    for out in filter(is_step, job):
        header = out[LAYERS]
        if not asked_to_recalibrate and local_cells(header) > 0:
            client.predict(token, api_name="/recalibrate")
            asked_to_recalibrate = True
        elif stopped is None and "recalibrations: 1" in header:
            stopped = client.predict(token, api_name="/stop")
    assert job.status().success and asked_to_recalibrate and stopped is not None
    files, report = stopped
    chunks = report["runs"]["ISPA"]["chunks"]
    assert report["stopped_early"]
    # The model runs a few chunks ahead of the updates the client reacts to (app.prefetch), but stops early.
    whole_run = math.ceil(5.0 * FPS / chunks[0]["frames"])
    assert 3 <= len(chunks) < whole_run
    assert [c["event"] for c in chunks].count("recalibration_started") == 1
    # What the Stop button hands over is what was generated, and the stream's last update says so.
    names = {f["orig_name"]: f for f in files}
    assert video_frames(fetch(names["avatar-ispa.mp4"]["url"])) == sum(c["frames"] for c in chunks)
    assert "stopped" in job.outputs()[-1][STATUS]


def bad_requests(examples_dir: Path, tmp_path: Path) -> list[tuple[dict, str]]:
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, dtype=np.float32), 16000)
    dc_offset = tmp_path / "dc.wav"
    sf.write(dc_offset, np.full(16000, 0.3, dtype=np.float32), 16000, subtype="FLOAT")
    one_sample = tmp_path / "one.wav"
    sf.write(one_sample, np.full(1, 0.5, dtype=np.float32), 16000, subtype="FLOAT")
    not_an_image = tmp_path / "portrait.png"
    not_an_image.write_bytes(b"this is not a picture")
    portrait = examples_dir / "fashion_blogger.jpg"
    speech = speech_clip(examples_dir, tmp_path, 1.0)
    cases = [
        ({"portrait": None, "audio": speech}, "Please provide a portrait image."),
        ({"portrait": not_an_image, "audio": speech}, "The portrait is not a readable image."),
        ({"portrait": portrait, "audio": silent}, "The audio is silent"),
        ({"portrait": portrait, "audio": None}, "Please provide the driving audio"),
        (
            {"portrait": portrait, "audio": None, "text": "word " * 120},
            "The text to speak is 599 characters long",
        ),
        ({"portrait": portrait, "audio": None, "text": "😀 \u200f"}, "Please type some text to speak"),
        ({"portrait": portrait, "audio": dc_offset}, "The audio is silent"),
        ({"portrait": portrait, "audio": one_sample}, "The audio is too short (1 sample(s)"),
        ({"portrait": portrait, "audio": speech, "size": "huge"}, "The size must be 'default' or one of"),
        ({"portrait": portrait, "audio": speech, "kv_format": "int3"}, "The KV-cache format must be one of"),
        ({"portrait": portrait, "audio": speech, "steps": 5}, "The denoising steps must be one of: 4, 3, 2"),
    ]
    # The engine settings: the app's own message naming the field and what it allows, never Gradio's
    # "Value -1 is less than minimum value 0.05." and never a rounded seed.
    seed = f"The seed must be a whole number from 0 to {MAX_SEED}, got"
    k = "The fraction of local layers (k_fraction) must be a number in (0, 1]"
    warm = "The warmup length (T_warm) must be a whole number of latent frames from 6 to 48"
    cases += [
        ({"portrait": portrait, "audio": speech, "seed": -1}, f"{seed} -1."),
        ({"portrait": portrait, "audio": speech, "seed": "abc"}, f"{seed} 'abc'."),
        ({"portrait": portrait, "audio": speech, "seed": True}, f"{seed} True."),
        ({"portrait": portrait, "audio": speech, "seed": 1.5}, f"{seed} 1.5 (it is not rounded for you)."),
        ({"portrait": portrait, "audio": speech, "k": 0}, f"{k}, got 0."),
        ({"portrait": portrait, "audio": speech, "k": -1}, f"{k}, got -1."),
        ({"portrait": portrait, "audio": speech, "k": "NaN"}, f"{k} (a finite number), got 'NaN'."),
        ({"portrait": portrait, "audio": speech, "k": None}, f"{k}, got None."),
        (
            {"portrait": portrait, "audio": speech, "t_warm": 3},
            f"{warm}, rounded up to whole 3-frame blocks, got 3.",
        ),
        ({"portrait": portrait, "audio": speech, "t_warm": 60}, "got 60."),
        (
            {"portrait": portrait, "audio": speech, "policy": None},
            "The policy must be one of: ISPA, Full, Compare.",
        ),
    ]
    reason = model_availability().get("14b")
    if reason is not None:  # on a machine that can run it, asking for 14B is not an error
        cases.append(({"portrait": portrait, "audio": speech, "model": "14b"}, "not available here"))
    return cases


def test_bad_inputs_get_clear_errors_and_the_app_keeps_serving(
    client, examples_dir: Path, tmp_path: Path
) -> None:
    for kwargs, message in bad_requests(examples_dir, tmp_path):
        portrait, audio = kwargs.pop("portrait"), kwargs.pop("audio")
        with pytest.raises(AppError) as caught:
            submit(client, portrait, audio, **kwargs).result()
        text = str(caught.value)
        assert message in text
        assert str(tmp_path) not in text and "Traceback" not in text
    outputs = run(
        client, examples_dir / "fashion_blogger.jpg", speech_clip(examples_dir, tmp_path, 1.0), policy="Full"
    )
    assert len(outputs[-1][REPORT]["runs"]["Full"]["chunks"]) >= 2


def raw_call(url: str, body: str) -> dict:
    """POST a hand-written JSON body to /generate (what a client other than gradio_client may send: NaN, lone
    surrogates as JSON escapes, too few values) and return the event that ends the call."""
    base = url.rstrip("/") + "/gradio_api/call/generate"
    response = httpx.post(base, content=body, headers={"content-type": "application/json"}, timeout=60)
    response.raise_for_status()
    stream = httpx.get(f"{base}/{response.json()['event_id']}", timeout=120).text
    events = re.findall(r"event: (\w+)\ndata: (.*)", stream)
    assert events, stream
    kind, data = events[-1]
    return {"event": kind, "data": json.loads(data)}


def upload(url: str, path: Path) -> str:
    """A JSON FileData for a file uploaded the way clients do (only uploaded files are accepted as inputs)."""
    with path.open("rb") as f:
        response = httpx.post(url.rstrip("/") + "/gradio_api/upload", files={"files": f}, timeout=60)
    response.raise_for_status()
    return json.dumps({"path": response.json()[0], "meta": {"_type": "gradio.FileData"}})


def test_raw_api_calls_get_the_apps_messages(app_url: str, examples_dir: Path, tmp_path: Path) -> None:
    portrait = upload(app_url, examples_dir / "fashion_blogger.jpg")
    speech = upload(app_url, speech_clip(examples_dir, tmp_path, 1.0))

    def body(
        *, seed: str = "1", k: str = "0.5", prompt: str = '""', text: str = '""', audio: str = speech
    ) -> str:
        return f'{{"data": [{portrait}, {audio}, {text}, {prompt}, "ISPA", {k}, 6, {seed}, "tiny", 0.001, "{SMALL}"]}}'

    def error(payload: str) -> str:
        result = raw_call(app_url, payload)
        assert result["event"] == "error", result
        return result["data"]["error"]

    assert (
        error(body(seed="NaN"))
        == f"The seed must be a whole number from 0 to {MAX_SEED} (a finite number), got nan."
    )
    assert error(body(k="null")).endswith("(k_fraction) must be a number in (0, 1], got None.")
    assert error(body(prompt='"a \\ud800 face"')) == (
        "The prompt contains a broken character (a lone UTF-16 surrogate, U+D800) at position 3; "
        "please retype or paste the text again."
    )
    assert error(body(text='"hi \\udfff"', audio="null")).startswith(
        "The text to speak contains a broken character (a lone UTF-16 surrogate, U+DFFF) at position 4"
    )
    assert error('{"data": [null, null, ""]}') == (
        "/generate takes 17 input values and got 3; missing: prompt, policy, k_fraction, t_warm, seed, model, "
        "lam, size, kv_format, refresh_sink, owner_token, compare_a, compare_b, steps. The inputs, in order: "
        "portrait, audio, text, prompt, policy, k_fraction, t_warm, seed, model, lam, size, kv_format, "
        "refresh_sink, owner_token, compare_a, compare_b, steps."
    )
    server_file = '{"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}'
    assert error(body(audio=server_file)) == (
        "The audio field names a file on the server, which is not accepted: upload the file instead "
        "(gradio_client's handle_file does, or POST it to /gradio_api/upload first)."
    )
    # The 11 values of a client written before the two optional inputs existed: they take their defaults, and
    # the call reaches the app's own checks (the seed, here).
    assert error(body(seed="-1")).startswith("The seed must be a whole number from 0 to")


def test_control_characters_rtl_marks_and_emoji_do_not_stop_a_run(
    client, examples_dir: Path, tmp_path: Path
) -> None:
    """NUL, escape, right-to-left marks and emoji in the prompt and the text to speak: cleaned, then a run."""
    job = client.submit(
        handle_file(str(examples_dir / "fashion_blogger.jpg")),
        None,
        "Hello\x00 there \u200f\u202e 😀 friend",
        "a\x1b person \u2066smiles 😀",
        "Full",
        0.5,
        6,
        1,
        "tiny",
        1e-3,
        SMALL,
        api_name="/generate",
    )
    job.result()
    assert job.status().success
    report = job.outputs()[-1][REPORT]
    assert report["prompt"] == "a person smiles 😀" and report["speech"] == "text"
    assert report["runs"]["Full"]["video_seconds"] > 0
