"""Triton as an optional dependency: the mode its kernels run in and where they can run."""

from __future__ import annotations

import pytest
import torch

from comoe.moe import triton_jit
from comoe.moe.triton_jit import TRITON_AVAILABLE, jit, next_power_of_2, runnable, tl

pytestmark = pytest.mark.skipif(not TRITON_AVAILABLE, reason="Triton is not installed (the 'triton' extra)")
interpreted_only = pytest.mark.skipif(not triton_jit.INTERPRETER, reason="kernels compiled for the GPU (TRITON_INTERPRET=0)")


def _double(x_ptr, y_ptr, size, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < size
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=inside) * 2, mask=inside)


@interpreted_only
def test_kernels_run_in_the_interpreter_the_test_suite_sets():
    """tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported; a kernel runs on CPU tensors."""
    assert triton_jit.INTERPRETER
    kernel = jit(_double)
    assert type(kernel).__name__ == "InterpretedFunction"
    x = torch.randn(37)
    y = torch.empty_like(x)
    kernel[(3,)](x, y, 37, BLOCK=16)
    torch.testing.assert_close(y, 2 * x)


@interpreted_only
def test_where_the_kernels_run(monkeypatch):
    assert runnable("cuda") is None and runnable("cpu") is None  # the interpreter runs any device's tensors
    monkeypatch.setattr(triton_jit, "INTERPRETER", False)
    assert runnable("cuda") is None
    assert "run on CUDA tensors" in runnable("cpu")
    monkeypatch.setattr(triton_jit, "TRITON_AVAILABLE", False)
    assert "pip install 'comoe[triton]'" in runnable("cuda")


@pytest.mark.parametrize(("value", "expected"), [(1, 1), (2, 2), (3, 4), (16, 16), (17, 32)])
def test_next_power_of_2(value, expected):
    assert next_power_of_2(value) == expected
