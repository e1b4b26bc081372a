"""Compile comoe's Triton kernels ahead of time for a CUDA GPU (sm_90: H100/H200), on a machine without one.

Run as a script with TRITON_INTERPRET=0 (tests/moe/test_triton_jit.py does): Triton lowers each kernel to
PTX and ptxas (shipped in the triton wheel) assembles it, so what the interpreter accepts but the
compiler refuses (a non-constexpr global in a kernel -- the interpreter runs it, the compiler raises NameError --, a dot
of mismatched dtypes or too small blocks, an unsupported cast) fails here. Prints one line per kernel and dtype; exits non-zero on the first failure.
"""

import os
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from comoe.moe import triton_mix
from comoe.objectives import triton_infonce

TARGET = GPUTarget("cuda", 90, 32)
FLOATS = {"scaling", "inv_temperature", "eps_sq"}
INT64 = {"szt", "sze", "szr"}


def compile_kernel(kernel, pointers: dict[str, str], constexprs: dict[str, object]) -> int:
    """PTX size of `kernel` compiled with these pointer element types (by argument name; others: the
    data dtype 'data') and constexprs; scalars are int32 but for strides (int64) and FLOATS (fp32)."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointers.get(name, pointers["data"])
        else:
            signature[name] = "fp32" if name in FLOATS else "i64" if name in INT64 else "i32"
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=TARGET)
    assert compiled.asm["cubin"], "ptxas produced no binary"
    return len(compiled.asm["ptx"])


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET") == "0", "run with TRITON_INTERPRET=0"
    indices = {name: "i64" for name in ("order_ptr", "block_ends_ptr", "group_start_ptr", "counts_ptr")}
    fp32 = {name: "fp32" for name in ("gates_ptr", "dgate_ptr", "y_ptr")}
    for dtype in ("fp32", "bf16", "fp16"):
        sizes = {"BLOCK_M": 64, "BLOCK_R": 16, "BLOCK_N": 64, "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
        pointers = {"data": dtype, **indices, **fp32}
        for kernel, extra in (
            (triton_mix.MIX_FORWARD, {"BLOCK_E": 8}),
            (triton_mix.MIX_BACKWARD_Z, {"BLOCK_E": 8}),
            (triton_mix.MIX_BACKWARD_B, {}),
        ):
            print(kernel.fn.__name__, dtype, compile_kernel(kernel, pointers, {**sizes, **extra}), "bytes of PTX")
    for has_floor in (True, False):
        pointers = {"data": "fp32", "idx_ptr": "i64"}
        constexprs = {"HAS_FLOOR": has_floor, "BLOCK_T": 16, "BLOCK_K": 2, "BLOCK_N": 8}
        kernel = triton_infonce.COMOE_INFONCE
        print(kernel.fn.__name__, has_floor, compile_kernel(kernel, pointers, constexprs), "bytes of PTX")
    return 0


if __name__ == "__main__":
    sys.exit(main())
