"""The pipeline's channel without any process group: what is taken out of a message as tensors and put back,
how a receiver keeps other runs' messages, the one flattened all-reduce of an absorb, and what `join` sets up
(emulated: the collectives are stand-ins that record their calls)."""

from __future__ import annotations

import pickle
from datetime import timedelta

import torch

from avatars.liveavatar.distributed import channel as channel_module
from avatars.liveavatar.distributed import world as world_module
from avatars.liveavatar.distributed.channel import BULK_TAGS, PeerChannel, Tag, pack_tensors, unpack_tensors
from avatars.liveavatar.distributed.world import PipelineWorld, sum_flattened
from avatars.liveavatar.dit.audio_encoder import AudioTokens
from avatars.liveavatar.streaming.messages import BlockWork, DecodedBlock, RunSpec
from ispa import ISPAPolicy


def _work() -> BlockWork:
    tokens = AudioTokens(torch.randn(1, 3, 5, 8, dtype=torch.bfloat16), torch.randn(1, 3, 1, 8))
    mass = [torch.tensor(0.25), None, torch.tensor([1.5, 2.5], dtype=torch.float64)]
    return BlockWork(7, 3, torch.randn(1, 4, 3, 2, 2, dtype=torch.bfloat16), tokens, True, mass, [1, 0, 2])


def test_every_tensor_of_a_block_is_taken_out_and_put_back_bit_for_bit() -> None:
    work = _work()
    header, tensors = pack_tensors(work)
    assert len(tensors) == 5  # latents, two token tensors, two history sums
    assert not any(isinstance(v, torch.Tensor) for v in pickle.loads(pickle.dumps(header)).__dict__.values())
    layout, nbytes = channel_module._byte_layout(tensors)
    buffer = channel_module._pack_bytes(tensors, nbytes, layout, torch.device("cpu"))
    assert all(offset % 16 == 0 for _, _, offset in layout)
    back = unpack_tensors(header, channel_module._unpack_bytes(buffer, layout))
    assert (back.run, back.block, back.recalibrate, back.mass_counts) == (7, 3, True, [1, 0, 2])
    assert isinstance(back.audio, AudioTokens) and back.mass_sums[1] is None
    pairs = [
        (back.latents, work.latents),
        *zip(back.audio, work.audio, strict=True),
        (back.mass_sums[0], work.mass_sums[0]),
    ]
    pairs.append((back.mass_sums[2], work.mass_sums[2]))
    for got, want in pairs:
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


def test_a_part_without_tensors_is_left_as_it_is() -> None:
    policy = ISPAPolicy(t_warm=6)
    spec = RunSpec(1, policy, "fp8", False, 3, torch.zeros(1, 2, 4), torch.zeros(1, 4, 1, 2, 2),
                   torch.zeros(1, 4, 5, 2, 2), 2, 2)  # fmt: skip
    header, tensors = pack_tensors(spec)
    assert len(tensors) == 3 and header.policy is policy  # the policy is pickled whole, never rebuilt
    end = BlockWork(1, 4)
    assert pack_tensors(end) == (end, [])


class _Scripted(PeerChannel):
    """A channel whose wire is a list of messages per (source, tag), in arrival order."""

    def __init__(self, wire: dict[tuple[int, Tag], list]) -> None:
        super().__init__(0)
        self.wire = wire
        self.received = 0

    def recv(self, src, tag, timeout=None):
        self.received += 1
        return self.wire[(src, tag)].pop(0)


def test_a_receiver_takes_its_runs_message_and_keeps_the_others_in_order() -> None:
    frames = [DecodedBlock(run, block) for run, block in [(1, 0), (2, 0), (1, 1), (2, 1), (1, 2)]]
    channel = _Scripted({(4, Tag.FRAMES): list(frames)})
    assert channel.recv_run(4, Tag.FRAMES, 2) is frames[1]  # run 1's first block is kept
    assert channel.recv_run(4, Tag.FRAMES, 1) is frames[0]  # from what was kept, without receiving
    assert channel.received == 2
    assert channel.recv_run(4, Tag.FRAMES, 1) is frames[2]
    assert channel.recv_run(4, Tag.FRAMES, 1) is frames[4]  # run 2's block 1 kept on the way
    assert channel.recv_run(4, Tag.FRAMES, 2) is frames[3]
    assert channel.received == 5


def test_bulk_travels_only_down_the_pipeline_and_back_to_rank_0() -> None:
    # NCCL has no tags: each directed pair of ranks may carry bulk tensors under one tag only.
    assert {Tag.DOWN, Tag.FRAMES} == BULK_TAGS


def test_a_sent_message_is_header_then_one_buffer_on_the_tensor_group(monkeypatch) -> None:
    sent = []

    class Done:
        def is_completed(self) -> bool:
            return True

    def isend(tensor, dst, group=None, tag=0):
        sent.append((tensor.clone(), dst, group, tag))
        return Done()

    monkeypatch.setattr(channel_module.dist, "isend", isend)
    control, bulk = object(), object()
    channel = PeerChannel(0, control, tensor_group=bulk)
    work = _work()
    work.latents = torch.randn(1, 16, 3, 8, 8, dtype=torch.bfloat16)  # 6 kB
    channel.send(work, 1, Tag.DOWN)
    assert [(dst, group, tag) for _, dst, group, tag in sent] == [
        (1, control, 1),
        (1, control, 1),
        (1, bulk, 1),
    ]
    length, payload, buffer = (t for t, *_ in sent)
    assert int(length) == payload.numel() < 1024 < buffer.numel()  # the pickle holds no tensor data
    assert channel.seconds_since_send(1) < 60 and channel.seconds_since_send(2) == float("inf")
    sent.clear()
    channel.send(DecodedBlock(7, 3), 0, Tag.REPORT)  # nothing to take out: two control sends
    assert len(sent) == 2


def test_an_absorb_sums_its_statistics_in_one_collective_per_dtype() -> None:
    tensors = [
        torch.full((3, 3), 1.0),
        torch.arange(4.0),
        torch.ones(2, dtype=torch.float64),
        torch.tensor(2.0),
    ]
    calls = []

    def all_reduce(buffer: torch.Tensor) -> None:  # three ranks holding the same values
        calls.append(buffer.dtype)
        buffer.mul_(3)

    sum_flattened(tensors, all_reduce)
    assert sorted(map(str, calls)) == ["torch.float32", "torch.float64"]
    assert torch.equal(tensors[0], torch.full((3, 3), 3.0)) and torch.equal(tensors[1], torch.arange(4.0) * 3)
    assert torch.equal(tensors[2], torch.full((2,), 3.0, dtype=torch.float64))
    assert tensors[3].item() == 6.0


def test_join_binds_nccl_to_the_gpu_and_makes_the_dit_communicator_at_once(monkeypatch) -> None:
    """On GPUs (emulated): NCCL is bound to LOCAL_RANK's device at init, control goes over gloo, and the DiT
    ranks' group runs one collective at join, not in the first absorb."""
    calls: dict[str, list] = {"init": [], "new_group": [], "all_reduce": []}
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(world_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(world_module.torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(world_module.torch, "zeros", lambda *a, device=None, **k: torch.empty(1))
    dist = world_module.dist
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls["init"].append((backend, kw)))
    monkeypatch.setattr(dist, "get_world_size", lambda: 3)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(
        dist, "new_group", lambda *a, **kw: calls["new_group"].append((a, kw)) or len(calls["new_group"])
    )
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, group=None: calls["all_reduce"].append(group))
    world = PipelineWorld.join(timeout=timedelta(seconds=9))
    backend, options = calls["init"][0]
    assert backend == "nccl" and options["device_id"] == torch.device("cuda", 1)
    assert calls["new_group"][0][1]["backend"] == "gloo"  # the control messages' group
    assert calls["new_group"][1][0] == ([0, 1],)  # the DiT ranks of K = 3
    assert calls["all_reduce"] == [world.dit_group] and world.dit_group == 2
    assert world.channel.group == 1 and world.channel.tensor_device == torch.device("cuda", 1)
