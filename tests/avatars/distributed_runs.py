"""Scripted runs of the tiny model, one process or a pipeline of several, for the distributed tests.

Spawned ranks import this module (spawn pickles the function by name), so it is a plain module, not a test.
"""

from __future__ import annotations

import os
import pickle
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from avatars.base import GenerationRequest
from avatars.liveavatar.loading import build_tiny_pipeline
from avatars.liveavatar.pipeline import RunControl
from avatars.media.audio import read_audio_file
from avatars.media.portrait import read_portrait
from ispa import make_policy

EXAMPLES = Path(__file__).resolve().parents[3] / "shared" / "examples"
TIMING_KEYS = {"seconds", "decode_seconds", "merge_seconds", "statistics_seconds", "absorb_seconds"}


@dataclass(frozen=True)
class Scenario:
    """One run: the policy, the clip length, and the blocks at which recalibration or cancel are asked for."""

    policy: str = "full"
    policy_options: tuple[tuple[str, float], ...] = ()
    seconds: float = 1.5
    seed: int = 5
    recalibrate_at: int | None = None
    cancel_at: int | None = None
    refresh_sink: bool = False
    live: bool = False  # the speech arrives in 0.25 s pieces while the run goes on, as from the microphone


class ScriptedControl(RunControl):
    """Asks for recalibration / cancel when the run reaches a given block (the run asks once per block)."""

    def __init__(self, recalibrate_at: int | None, cancel_at: int | None) -> None:
        super().__init__()
        self.blocks_started = 0
        self._recalibrate_at = recalibrate_at
        self._cancel_at = cancel_at

    @property
    def cancelled(self) -> bool:
        return self._cancel_at is not None and self.blocks_started >= self._cancel_at

    def take_recalibration(self) -> bool:
        block, self.blocks_started = self.blocks_started, self.blocks_started + 1
        return block == self._recalibrate_at


def request_for(scenario: Scenario) -> GenerationRequest:
    audio, rate, _ = read_audio_file(EXAMPLES / "fashion_blogger.wav")
    portrait = read_portrait(EXAMPLES / "fashion_blogger.jpg").image
    clip = audio[: int(scenario.seconds * rate)]
    piece = rate // 4
    return GenerationRequest(
        portrait=portrait,
        audio=(clip[i : i + piece] for i in range(0, len(clip), piece)) if scenario.live else clip,
        sample_rate=rate,
        prompt="a talk",
        seed=scenario.seed,
    )


def open_stream(stream, scenario: Scenario):
    policy = make_policy(scenario.policy, **dict(scenario.policy_options))
    control = ScriptedControl(scenario.recalibrate_at, scenario.cancel_at)
    return stream(request_for(scenario), policy, control=control, refresh_sink=scenario.refresh_sink)


def chunk_data(chunk) -> dict:
    """A chunk as plain data: frames, audio and the report without its timings."""
    return {
        "index": chunk.index,
        "frames": chunk.frames,
        "audio": chunk.audio,
        "report": {k: v for k, v in chunk.report.to_dict().items() if k not in TIMING_KEYS},
    }


def run_scenario(stream, scenario: Scenario) -> list[dict]:
    return [chunk_data(chunk) for chunk in open_stream(stream, scenario)]


def run_taking_turns(stream, scenarios: tuple[Scenario, ...]) -> list[list[dict]]:
    """The scenarios' streams open at once, as compare mode runs them: the first hands out one chunk alone,
    then each hands out one in turn; every stream's chunks."""
    streams = [open_stream(stream, scenario) for scenario in scenarios]
    results: list[list[dict]] = [[chunk_data(next(streams[0]))]] + [[] for _ in scenarios[1:]]
    running = list(range(len(streams)))
    while running:
        for i in list(running):
            chunk = next(streams[i], None)
            if chunk is None:
                running.remove(i)
            else:
                results[i].append(chunk_data(chunk))
    return results


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(
    rank: int,
    world_size: int,
    port: int,
    scenarios: list[Scenario],
    out: str,
    decoder_on_last_dit: bool = False,
    timeout_s: float = 120.0,
    die: tuple[int, int] | None = None,
    portrait_latents: dict | None = None,
    taking_turns: tuple[Scenario, ...] = (),
) -> None:
    """One rank: rank 0 leads the scenarios, then (if any) the `taking_turns` ones at once, and pickles their
    chunks (or its error) to `out`; `die` = (rank, block): that rank exits abruptly when asked to process that
    block. `portrait_latents`: the parent's encodes of the portrait (same seeded VAE, so the same tensors), to
    spare every rank 0 that encode. The other ranks load only their stage's models, as under torchrun."""
    from avatars.liveavatar.distributed.stages import DiTStage

    from avatars.liveavatar import distributed

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if die is not None and die[0] == rank:
        process = DiTStage.process

        def process_or_die(self, work):
            if work.block == die[1]:
                os._exit(17)
            return process(self, work)

        DiTStage.process = process_or_die
    world = distributed.PipelineWorld.join(
        rank=rank,
        world_size=world_size,
        decoder_on_last_dit=decoder_on_last_dit,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        if rank == 0:
            pipe = build_tiny_pipeline(seed=0)
            if portrait_latents:
                pipe.portrait_latents._entries.update(portrait_latents)
            lead = distributed.PipelineLead(pipe, world)
            results: list = []
            try:
                for scenario in scenarios:
                    results.append(run_scenario(lead.stream, scenario))
                if taking_turns:
                    results.append(run_taking_turns(lead.stream, taking_turns))
                lead.shutdown()
            except distributed.RankFailure as err:
                results.append(err)
                try:  # the pipeline is down now: a next run is refused at once
                    next(open_stream(lead.stream, Scenario()))
                except distributed.RankFailure as again:
                    results.append(again)
            Path(out).write_bytes(pickle.dumps(results))
        else:
            distributed.follow_runs(
                distributed.load_stage_models("tiny", world.layout, rank, fp8=False), world
            )
    finally:
        world.close()


def run_pipeline(world_size: int, scenarios: list[Scenario], tmp: Path, **options) -> list:
    """Spawn the ranks, wait for all, and return rank 0's results."""
    import torch.multiprocessing as mp

    out = tmp / f"results-{world_size}.pkl"
    port = free_port()
    context = mp.start_processes(
        rank_main,
        args=(world_size, port, scenarios, str(out), *_options(options)),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    for process in context.processes:
        process.join(300)
    for process in context.processes:
        if process.is_alive():  # only after a hang: the test then fails below, without leaving ranks behind
            process.kill()
    return pickle.loads(out.read_bytes())


def _options(options: dict) -> tuple:
    return (
        options.get("decoder_on_last_dit", False),
        options.get("timeout_s", 120.0),
        options.get("die"),
        options.get("portrait_latents"),
        options.get("taking_turns", ()),
    )


def same_chunks(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x["index"] == y["index"]
        and np.array_equal(x["frames"], y["frames"])
        and np.array_equal(x["audio"], y["audio"])
        and x["report"] == y["report"]
        for x, y in zip(a, b, strict=True)
    )
