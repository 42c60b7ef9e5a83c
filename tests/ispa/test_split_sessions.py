"""One run's forwards split between two sessions (one ring each), as the several-GPU pipeline splits them by step.

With the statistics summed over both before the absorb (`statistics_reducer`) and the history-share sums handed
from the first to the second (`history_mass_sums` / `continue_history_mass`), both sessions absorb the same layers
as one session holding both rings; until the absorb the outputs and the second's history share are bit-identical,
after it they agree up to the order of float additions in the statistics.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from ispa import AttentionSession, ISPAPolicy
from tests.fixtures.toy_model import ToyConfig, ToyRun, ToyTransformer

CONFIG = ToyConfig()  # 4 layers, 2 rings
BLOCKS = 6


class ThreadAllReduce:
    """An in-process all-reduce between sessions whose `end_block` runs in parallel threads."""

    def __init__(self, parties: int) -> None:
        self._barrier = threading.Barrier(parties, timeout=30)
        self._posted: dict[int, list[torch.Tensor]] = {}
        self.calls = 0

    def member(self, index: int):
        def reduce_sum(tensors: list[torch.Tensor]) -> None:
            self._posted[index] = [t.clone() for t in tensors]
            self._barrier.wait()
            for i, tensor in enumerate(tensors):
                tensor.copy_(sum(self._posted[j][i] for j in sorted(self._posted)))
            self.calls += 1
            self._barrier.wait()

        return reduce_sum


def policy() -> ISPAPolicy:
    return ISPAPolicy(k_fraction=0.5, t_warm=3)


def test_two_sessions_absorb_like_one():
    model = ToyTransformer(CONFIG)
    single = AttentionSession(policy(), CONFIG.num_layers, CONFIG.layout())
    reference = ToyRun(model, single, seed=4)
    reducer = ThreadAllReduce(2)
    split = [
        AttentionSession(policy(), CONFIG.num_layers, CONFIG.layout(), statistics_reducer=reducer.member(i))
        for i in range(2)
    ]
    # The same sink and inputs for the split run: a second ToyRun with the same seed on the first session, whose
    # sink is then copied into the second (both hold the same sink, as every DiT rank does).
    driver = ToyRun(model, split[0], seed=4)
    for layer in range(CONFIG.num_layers):
        split[1].write_sink(layer, *split[0].sink(layer))

    with ThreadPoolExecutor(2) as pool:
        for _ in range(BLOCKS):
            want, want_report = reference.step()
            x = driver._previous
            got = []
            for ring, session in enumerate(split):
                if ring == 1:
                    split[1].continue_history_mass(*split[0].history_mass_sums())
                noise = torch.randn(x.shape, generator=driver._generator)
                x = model.forward_block(session, 0.5 * x + noise, ring)
                got.append(x)
            driver._previous = x
            reports = list(pool.map(lambda s: s.end_block(), split))

            for g, w in zip(got, want, strict=True):
                if want_report.phase == "warmup":  # no ΔW yet: the same computation, bit for bit
                    assert torch.equal(g, w)
                else:  # ΔW from sums added in another order; the toy's sharp attention amplifies it a little
                    torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4)
            for report in reports:
                assert (report.phase, report.l_layers, report.event) == (
                    want_report.phase,
                    want_report.l_layers,
                    want_report.event,
                )
            if want_report.phase == "warmup":
                assert reports[1].history_mass == want_report.history_mass
            else:
                got_mass = [m for m in reports[1].history_mass if m is not None]
                want_mass = [m for m in want_report.history_mass if m is not None]
                torch.testing.assert_close(torch.tensor(got_mass), torch.tensor(want_mass), rtol=1e-4, atol=0)
            if want_report.epsilon is not None:
                assert reports[0].epsilon == reports[1].epsilon
                torch.testing.assert_close(
                    torch.tensor(reports[0].epsilon), torch.tensor(want_report.epsilon), rtol=1e-4, atol=1e-6
                )
    assert reducer.calls == 2  # one absorb, one all-reduce per session
    assert single.local_layers == split[0].local_layers == split[1].local_layers != []
