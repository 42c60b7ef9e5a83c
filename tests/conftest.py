"""Suite-wide settings, applied at configure time (before collection).

* Hypothesis's on-disk cache goes to a temporary directory: tests must not write into the working tree, and
  Hypothesis writes ./.hypothesis while pytest collects (its plugin caches source constants).
* torch runs one intra-op thread: the tiny models gain nothing from two on a 2-core machine, and two threads
  thrash badly whenever the served app or another process is busy at the same time (a tiny VAE decode went
  from 0.3 s to 4 s).
"""

from __future__ import annotations

import shutil
import tempfile

import pytest
import torch
from hypothesis.configuration import set_hypothesis_home_dir

_hypothesis_dir: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _hypothesis_dir
    _hypothesis_dir = tempfile.mkdtemp(prefix="hypothesis-")
    set_hypothesis_home_dir(_hypothesis_dir)
    torch.set_num_threads(1)


def pytest_unconfigure(config: pytest.Config) -> None:
    set_hypothesis_home_dir(None)
    if _hypothesis_dir is not None:
        shutil.rmtree(_hypothesis_dir, ignore_errors=True)
