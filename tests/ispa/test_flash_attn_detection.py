"""flash-attn counts as available only when it imports; a broken install is logged once and skipped."""

import logging
import sys

import pytest

from ispa import attention_backends, available_backends


@pytest.fixture
def fresh_detection(monkeypatch):
    """Forget any earlier detection and any imported flash_attn, before and after the test."""
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)
    attention_backends.optional_function.cache_clear()
    yield
    attention_backends.optional_function.cache_clear()


def fake_package(root, init_source):
    package = root / "flash_attn"
    package.mkdir()
    (package / "__init__.py").write_text(init_source)


@pytest.mark.parametrize(
    "init_source",
    [
        # an ABI-mismatched build: the extension fails to load on import
        "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice')\n",
        "raise OSError('libcudart.so.12: cannot open shared object file')\n",
        # the FA4 namespace package: importable, but without flash_attn_func
        "cute = None\n",
    ],
    ids=["abi-mismatch", "missing-library", "fa4-only"],
)
def test_a_broken_flash_attn_is_skipped_with_one_log_line(
    tmp_path, monkeypatch, caplog, fresh_detection, init_source
):
    fake_package(tmp_path, init_source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="ispa.attention_backends"):
        first, second = available_backends("cuda"), available_backends("cuda")
    assert first == second == ["torch_cuda", "math"]
    assert (
        len(caplog.records) == 1
        and "flash_attn.flash_attn_func cannot be imported" in caplog.records[0].getMessage()
    )


def test_a_working_flash_attn_is_listed_first(tmp_path, monkeypatch, fresh_detection):
    fake_package(
        tmp_path, "def flash_attn_func(*args, **kwargs):\n    raise AssertionError('not called here')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert available_backends("cuda") == ["flash_attn", "torch_cuda", "math"]
    assert available_backends("cpu") == ["torch_cpu", "math"]


def test_an_absent_flash_attn_is_silent(monkeypatch, caplog, fresh_detection):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # makes `import flash_attn` fail as "not found"
    with caplog.at_level(logging.WARNING, logger="ispa.attention_backends"):
        assert "flash_attn" not in available_backends("cuda")
    assert caplog.records == []
