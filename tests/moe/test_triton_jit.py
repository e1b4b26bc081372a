"""Triton as an optional dependency: the mode its kernels run in and where they can run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comoe.moe import triton_jit
from comoe.moe.triton_jit import TRITON_AVAILABLE, jit, next_power_of_2, runnable, tl

pytestmark = pytest.mark.skipif(not TRITON_AVAILABLE, reason="Triton is not installed (the 'triton' extra)")
ROOT = Path(__file__).resolve().parents[2]
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


@pytest.mark.slow
def test_the_kernels_compile_for_a_cuda_gpu_without_one():
    """tests/moe/triton_aot.py compiles every kernel of comoe to PTX and a cubin for sm_90 (H100/H200) in
    float32, bfloat16 and float16: what only the compiler refuses fails here, with no GPU (~30 s)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "moe" / "triton_aot.py")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.endswith("bytes of PTX")]
    assert len(lines) == 11, done.stdout
