"""A fused mixture-of-LoRA up-projection for CUDA in Triton: the mix strategy 'triton'.

    out[t] = scaling * sum_j gate[t, j] * z[t, idx[t, j]] @ B[idx[t, j]]      z [T, n, r], B [n, r, d_out]

ScatterMoE's layout (Tan et al. 2024, arXiv 2403.08245, its scatter2scatter kernel): the T*k (token,
expert) pairs are sorted by expert and cut into blocks of BLOCK_M pairs that each belong to one expert.
One kernel launch then gathers each block's r-wide z rows straight from the [T, n, r] tensor (no gathered
copy), multiplies them by that expert's B tile on the tensor cores, applies gate and scaling and writes
the rows to their (token, slot) position; the k rows of a token are summed after (as ScatterMoE does for
k > 1; in float32, so the sum rounds once). Each program finds its expert and rows from the experts'
cumulative block counts (one cumsum on the device, no host sync); the grid is an upper bound,
ceil(T*k / BLOCK_M) + n blocks, and programs past the last block mask everything.

Backward, two kernels over the same layout, exact (no recomputation of the forward):

- dz and dgate: per block, h = grad_out[t] @ B[e]^T accumulated over d_out tiles; dz[t, e] = scaling *
  gate * h (zero for inactive experts), dgate[t, j] = scaling * z[t, e] . h;
- dB: per expert and d_out tile, dB[e] = scaling * sum over its pairs of (gate * z)^T grad_out[t]
  (ScatterMoE's groupXtY); an expert that received no pair gets exactly zero.

Float32 inputs use IEEE dots unless torch allows TF32 matmuls; half inputs accumulate in float32. Tested
in Triton's interpreter against the dense reference and the other strategies (tests/moe/test_triton_mix.py);
not yet measured on a GPU (docs/performance.md).
"""

from __future__ import annotations

import torch

from comoe.moe.experts import MixStrategy, register_strategy
from comoe.moe.routing import Routing, sort_by_expert
from comoe.moe.triton_jit import TRITON_AVAILABLE, jit, next_power_of_2, runnable, tl

BLOCK_M = 64  # (token, expert) pairs per block
BLOCK_N = 64  # output features per tile
MIN_DOT = 16  # tl.dot needs every dimension >= 16 on the GPU

__all__ = ["BLOCK_M", "BLOCK_N", "ScatterMix", "mix_triton", "scatter_mix", "triton_runs_on"]


def _block_rows(block_ends_ptr, group_start_ptr, counts_ptr, N, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """This program's expert and its rows [start, end) of the sorted pairs: block b belongs to the expert
    whose cumulative block count first exceeds b; blocks past the last expert's get an empty range."""
    block = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    ends = tl.load(block_ends_ptr + experts, mask=experts < N, other=2147483647)
    expert = tl.sum((ends <= block).to(tl.int32), axis=0)
    used = expert < N
    expert = tl.minimum(expert, N - 1)
    count = tl.load(counts_ptr + expert)
    first = tl.load(group_start_ptr + expert)
    first_block = tl.load(block_ends_ptr + expert) - (count + BLOCK_M - 1) // BLOCK_M
    start = first + (block - first_block) * BLOCK_M
    end = tl.where(used, first + count, start)
    return expert, start, end


def _mix_forward_kernel(
    z_ptr, szt, sze, szr, b_ptr, gates_ptr, order_ptr, block_ends_ptr, group_start_ptr, counts_ptr,
    y_ptr, K, N, R, D_OUT, scaling,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(1)
    expert, start, end = _block_rows(block_ends_ptr, group_start_ptr, counts_ptr, N, BLOCK_M, BLOCK_E)
    rows = start + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    pair = tl.load(order_ptr + rows, mask=row_mask, other=0)  # position in the flattened [T, k] routing
    token = pair // K
    rr = tl.arange(0, BLOCK_R)
    r_mask = rr < R
    zg = tl.load(
        z_ptr + token[:, None] * szt + expert * sze + rr[None, :] * szr,
        mask=row_mask[:, None] & r_mask[None, :],
        other=0.0,
    )
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < D_OUT
    b = tl.load(
        b_ptr + expert * R * D_OUT + rr[:, None] * D_OUT + cols[None, :],
        mask=r_mask[:, None] & col_mask[None, :],
        other=0.0,
    )
    acc = tl.dot(zg, b, input_precision=PRECISION)
    gate = tl.load(gates_ptr + pair, mask=row_mask, other=0.0).to(tl.float32) * scaling
    acc = acc * gate[:, None]
    tl.store(
        y_ptr + pair[:, None] * D_OUT + cols[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


def _mix_backward_z_kernel(
    z_ptr, szt, sze, szr, b_ptr, gates_ptr, order_ptr, block_ends_ptr, group_start_ptr, counts_ptr,
    grad_ptr, dz_ptr, dgate_ptr, K, N, R, D_OUT, scaling,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    expert, start, end = _block_rows(block_ends_ptr, group_start_ptr, counts_ptr, N, BLOCK_M, BLOCK_E)
    rows = start + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    pair = tl.load(order_ptr + rows, mask=row_mask, other=0)
    token = pair // K
    rr = tl.arange(0, BLOCK_R)
    r_mask = rr < R
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)  # grad_out[t] @ B[e]^T
    for start in range(0, D_OUT, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < D_OUT
        grad = tl.load(
            grad_ptr + token[:, None] * D_OUT + cols[None, :],
            mask=row_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        b_t = tl.load(
            b_ptr + expert * R * D_OUT + rr[None, :] * D_OUT + cols[:, None],
            mask=r_mask[None, :] & col_mask[:, None],
            other=0.0,
        )
        h += tl.dot(grad, b_t, input_precision=PRECISION)
    mask = row_mask[:, None] & r_mask[None, :]
    zg = tl.load(z_ptr + token[:, None] * szt + expert * sze + rr[None, :] * szr, mask=mask, other=0.0)
    dgate = tl.sum(zg.to(tl.float32) * h, axis=1) * scaling
    tl.store(dgate_ptr + pair, dgate.to(dgate_ptr.dtype.element_ty), mask=row_mask)
    gate = tl.load(gates_ptr + pair, mask=row_mask, other=0.0).to(tl.float32) * scaling
    dz = h * gate[:, None]
    dz_at = dz_ptr + token[:, None] * (N * R) + expert * R + rr[None, :]
    tl.store(dz_at, dz.to(dz_ptr.dtype.element_ty), mask=mask)


def _mix_backward_b_kernel(
    z_ptr, szt, sze, szr, gates_ptr, order_ptr, group_start_ptr, counts_ptr, grad_ptr, db_ptr,
    K, R, D_OUT, scaling,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    expert = tl.program_id(0)
    pid_n = tl.program_id(1)
    first = tl.load(group_start_ptr + expert)
    end = first + tl.load(counts_ptr + expert)
    rr = tl.arange(0, BLOCK_R)
    r_mask = rr < R
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < D_OUT
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for start in range(first, end, BLOCK_M):  # no iteration for an expert without pairs: dB = 0 exactly
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < end
        pair = tl.load(order_ptr + rows, mask=row_mask, other=0)
        token = pair // K
        gate = tl.load(gates_ptr + pair, mask=row_mask, other=0.0).to(tl.float32) * scaling
        zg = tl.load(
            z_ptr + token[:, None] * szt + expert * sze + rr[None, :] * szr,
            mask=row_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        weighted = (zg.to(tl.float32) * gate[:, None]).to(zg.dtype)
        grad = tl.load(
            grad_ptr + token[:, None] * D_OUT + cols[None, :],
            mask=row_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        acc += tl.dot(tl.trans(weighted), grad.to(zg.dtype), input_precision=PRECISION)
    tl.store(
        db_ptr + expert * R * D_OUT + rr[:, None] * D_OUT + cols[None, :],
        acc.to(db_ptr.dtype.element_ty),
        mask=r_mask[:, None] & col_mask[None, :],
    )


_block_rows = jit(_block_rows)  # called from the two block kernels
MIX_FORWARD = jit(_mix_forward_kernel)
MIX_BACKWARD_Z = jit(_mix_backward_z_kernel)
MIX_BACKWARD_B = jit(_mix_backward_b_kernel)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _precision(dtype: torch.dtype) -> str:
    """IEEE float32 dots, as torch's matmul, unless torch allows TF32 there."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _block_ends(counts: torch.Tensor, block_m: int) -> torch.Tensor:
    """[n] cumulative count of blocks of <= block_m sorted pairs per expert (each block one expert's)."""
    return torch.cumsum((counts + (block_m - 1)) // block_m, 0)


def _num_blocks(num_pairs: int, n: int, block_m: int) -> int:
    """An upper bound of the block count known without reading the counts on the host (no sync); the
    programs past the last block find an empty row range."""
    return _cdiv(num_pairs, block_m) + n


class ScatterMix(torch.autograd.Function):
    """The fused mixture of LoRA experts: forward and exact backward for z, gates and B (module docstring).

    Inputs: z [T, n, r] (any strides), gates [T, k], lora_B [n, r, d_out] (z's dtype), indices [T, k]
    (distinct experts per token, in [0, n)), scaling; block sizes. Output [T, d_out] in z's dtype.
    """

    @staticmethod
    def forward(
        ctx,
        z: torch.Tensor,
        gates: torch.Tensor,
        lora_B: torch.Tensor,
        indices: torch.Tensor,
        scaling: float,
        block_m: int,
        block_n: int,
    ) -> torch.Tensor:
        num_tokens, n, r = z.shape
        d_out = lora_B.shape[-1]
        k = indices.shape[1]
        lora_B = lora_B.contiguous()
        gates_flat = gates.contiguous().view(-1)
        pairs = sort_by_expert(indices, n)
        group_start = pairs.offsets - pairs.counts
        block_ends = _block_ends(pairs.counts, block_m)
        block_r = max(MIN_DOT, next_power_of_2(r))
        # k rows per token written apart and summed after; in float32 when k > 1 so the sum rounds once
        y = z.new_empty(num_tokens * k, d_out, dtype=z.dtype if k == 1 else torch.float32)
        if y.numel():
            MIX_FORWARD[(_num_blocks(num_tokens * k, n, block_m), _cdiv(d_out, block_n))](
                z, *z.stride(), lora_B, gates_flat, pairs.order, block_ends, group_start, pairs.counts, y,
                k, n, r, d_out, float(scaling), BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_N=block_n,
                BLOCK_E=next_power_of_2(n), PRECISION=_precision(z.dtype),
            )  # fmt: skip
        ctx.save_for_backward(z, gates_flat, lora_B, pairs.order, group_start, pairs.counts, block_ends)
        ctx.shape = (num_tokens, n, r, d_out, k)
        ctx.scaling, ctx.block_m, ctx.block_n, ctx.block_r = float(scaling), block_m, block_n, block_r
        ctx.gates_shape = gates.shape
        return y.view(num_tokens, d_out) if k == 1 else y.view(num_tokens, k, d_out).sum(1).to(z.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        z, gates_flat, lora_B, order, group_start, counts, block_ends = ctx.saved_tensors
        num_tokens, n, r, d_out, k = ctx.shape
        grad_out = grad_out.contiguous().to(z.dtype)
        precision = _precision(z.dtype)
        sizes = {"BLOCK_M": ctx.block_m, "BLOCK_R": ctx.block_r, "BLOCK_N": ctx.block_n}
        sizes["PRECISION"] = precision
        block_e = {"BLOCK_E": next_power_of_2(n)}
        grad_z = grad_gates = grad_b = None
        if (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]) and grad_out.numel():
            grad_z = torch.zeros(num_tokens, n, r, dtype=z.dtype, device=z.device)
            grad_gates = torch.empty_like(gates_flat)
            MIX_BACKWARD_Z[(_num_blocks(num_tokens * k, n, ctx.block_m),)](
                z, *z.stride(), lora_B, gates_flat, order, block_ends, group_start, counts,
                grad_out, grad_z, grad_gates, k, n, r, d_out, ctx.scaling, **sizes, **block_e,
            )  # fmt: skip
            grad_gates = grad_gates.view(ctx.gates_shape)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros_like(lora_B)
            if grad_out.numel():
                MIX_BACKWARD_B[(n, _cdiv(d_out, ctx.block_n))](
                    z, *z.stride(), gates_flat, order, group_start, counts, grad_out, grad_b,
                    k, r, d_out, ctx.scaling, **sizes,
                )  # fmt: skip
        if not ctx.needs_input_grad[0]:
            grad_z = None
        if not ctx.needs_input_grad[1]:
            grad_gates = None
        return grad_z, grad_gates, grad_b, None, None, None, None


def scatter_mix(
    z: torch.Tensor,
    gates: torch.Tensor,
    indices: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
) -> torch.Tensor:
    """scaling * sum_j gates[t, j] * z[t, indices[t, j]] @ lora_B[indices[t, j]]: [T, n, r] -> [T, d_out].

    z [T, n, r], gates and indices [T, k] (distinct experts per token, in [0, n)), lora_B [n, r, d_out]
    of z's dtype (float32 or float16 in the interpreter; bfloat16 too on CUDA). Differentiable in z,
    gates and lora_B. ValueError without Triton, off CUDA outside the interpreter, for mismatched shapes
    or dtypes, or block sizes that are not powers of two >= 16. ScatterMoE's scatter2scatter (arXiv
    2403.08245) applied to LoRA experts.
    """
    why_not = runnable(z.device.type)
    if why_not is not None:
        raise ValueError(f"expert_compute='triton': {why_not}")
    if z.dim() != 3 or lora_B.dim() != 3 or z.shape[1:] != lora_B.shape[:2]:
        shapes = f"{tuple(z.shape)}, {tuple(lora_B.shape)}"
        raise ValueError(f"z [T, n, r] and lora_B [n, r, d_out] disagree: {shapes}")
    if gates.shape != indices.shape or indices.shape[0] != z.shape[0]:
        raise ValueError(f"gates and indices must both be [T={z.shape[0]}, k], got {tuple(gates.shape)}, "
                         f"{tuple(indices.shape)}")  # fmt: skip
    if lora_B.dtype != z.dtype:
        raise ValueError(f"lora_B's dtype {lora_B.dtype} differs from z's {z.dtype}")
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size < MIN_DOT or size != next_power_of_2(size):
            raise ValueError(f"{name}={size} must be a power of two >= {MIN_DOT}")
    return ScatterMix.apply(z, gates, lora_B, indices, scaling, block_m, block_n)


def mix_triton(z: torch.Tensor, routing: Routing, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The mix strategy 'triton': `scatter_mix` of the routing's indices and gates ([T, n, r] -> [T, d_out]).
    """
    return scatter_mix(z, routing.gates, routing.indices, lora_B, scaling)


def triton_runs_on(device_type: str) -> bool:
    """Whether the Triton kernels run on tensors of that device type: CUDA with Triton installed."""
    return TRITON_AVAILABLE and device_type == "cuda"


def _triton_preference(device_type: str, num_experts: int, active: int) -> float:
    # Above blocks (2.0) on CUDA, where the fused kernel computes only the k active experts per token;
    # never chosen by 'auto' elsewhere (named with expert_compute: triton, it runs in the interpreter).
    return 3.0 if triton_runs_on(device_type) else 0.0


TRITON = register_strategy(MixStrategy("triton", mix_triton, _triton_preference))
