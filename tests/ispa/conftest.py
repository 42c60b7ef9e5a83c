"""Point Hypothesis's on-disk cache at a temporary directory: tests must not write into the working tree.

Hypothesis writes ./.hypothesis while pytest collects (its plugin caches source constants), so this has to happen
at configure time, before collection, rather than in a fixture.
"""

from __future__ import annotations

import shutil
import tempfile

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

_hypothesis_dir: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _hypothesis_dir
    _hypothesis_dir = tempfile.mkdtemp(prefix="hypothesis-")
    set_hypothesis_home_dir(_hypothesis_dir)


def pytest_unconfigure(config: pytest.Config) -> None:
    set_hypothesis_home_dir(None)
    if _hypothesis_dir is not None:
        shutil.rmtree(_hypothesis_dir, ignore_errors=True)
