"""Triton, optional: whether it is importable, the mode its kernels run in, and `jit` for comoe's kernels.

Triton fixes the mode when it is imported (its own library functions, `tl.zeros` or `tl.sum`, are jitted
then): kernels compile for the GPU, or with `TRITON_INTERPRET=1` in the environment before the import
they run in Triton's interpreter (numpy on the CPU, float32 and float16; no bfloat16). comoe's kernels are
for CUDA; the test suite sets the variable in tests/conftest.py and runs them in the interpreter. Nothing
in this module needs Triton to import: without it `TRITON_AVAILABLE` is False and `jit` returns the
plain function, which nothing launches.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

try:
    import triton
    import triton.language as tl
except ImportError:  # the optional extra `comoe[triton]` is not installed
    triton = None
    tl = None

TRITON_AVAILABLE = triton is not None
INSTALL_HINT = "install the optional extra: pip install 'comoe[triton]'"
# The mode Triton took at its import: the interpreter (TRITON_INTERPRET = 1/true/on/yes) or the GPU.
INTERPRETER = TRITON_AVAILABLE and os.environ.get("TRITON_INTERPRET", "0").strip().lower() in (
    "1", "true", "on", "yes",
)  # fmt: skip

__all__ = ["INSTALL_HINT", "INTERPRETER", "TRITON_AVAILABLE", "jit", "next_power_of_2", "runnable", "tl"]


def jit(fn: Callable[..., Any]) -> Any:
    """`triton.jit(fn)` where Triton is installed; `fn` unchanged (never launched) where it is not."""
    return fn if triton is None else triton.jit(fn)


def next_power_of_2(value: int) -> int:
    """The smallest power of two >= value (and >= 1): Triton's block shapes must be powers of two."""
    return 1 << max(value - 1, 0).bit_length()


def runnable(device_type: str) -> str | None:
    """None when comoe's Triton kernels can run on tensors of that device type (CUDA, or any device in the
    interpreter); else why not, as a sentence."""
    if not TRITON_AVAILABLE:
        return f"Triton is not installed: {INSTALL_HINT}"
    if device_type != "cuda" and not INTERPRETER:
        return (
            f"Triton kernels run on CUDA tensors (or in Triton's interpreter, TRITON_INTERPRET=1 before "
            f"triton is imported); got tensors on {device_type!r}"
        )
    return None
