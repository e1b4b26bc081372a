"""CoMoE's InfoNCE fused in one Triton kernel for CUDA: cosines from the experts' dot products, the
anchors' InfoNCE, forward and gradients in one pass over the tokens.

From each token's anchor dot products D[t, s, j] = e_{idx[t, s]} . e_j / scaling^2 ([..., T, k, n], the
k activated experts against all n; comoe.objectives.gram computes them from z and the Gram matrix) and
its squared norms q[t, j] = |e_j|^2 / scaling^2 ([..., T, n]), per token and anchor slot s, a = idx[t, s]:

    norm_j = max(sqrt(max(q_j, eps^2)), floor_t)                       (comoe.objectives.cosine)
    c_sj   = D_sj / (norm_a norm_j),        sim = c / temperature
    loss_s = logsumexp_{j != a} sim_sj - logsumexp_{j in top-k, j != a} sim_sj

the token's loss is the mean over its k anchors, and the result the mean over real tokens per leading
index: CoMoE's InfoNCE (arXiv 2505.17553, Algorithm 1) with every anchor and every inactive expert as a
negative (`anchor: all`, `num_negatives: null`), exactly `comoe_loss_from_anchor_cosines` of the cosines
(comoe.objectives.infonce). Other settings (a random anchor, sampled negatives) take the torch path.

The kernel writes each token's weighted loss and its gradients with respect to D and q (the softmax
differences through the cosines and the floored norms, torch's subgradients at the clamps included) in
the same pass; backward scales them by the incoming gradient. One program handles BLOCK_T tokens; n and
k are padded to powers of two. Tested in Triton's interpreter against the reference
(tests/objectives/test_triton_infonce.py); not yet measured on a GPU (docs/performance.md).
"""

from __future__ import annotations

import torch

from comoe.moe.triton_jit import TRITON_AVAILABLE, jit, next_power_of_2, runnable, tl
from comoe.objectives.cosine import NORMALIZE_EPS
from comoe.objectives.infonce import valid_mask

BLOCK_T = 16  # tokens per program

__all__ = [
    "BLOCK_T",
    "FusedComoeInfoNCE",
    "every_anchor_and_negative",
    "fused_comoe_applies",
    "fused_comoe_loss",
]


def _comoe_infonce_kernel(
    dots_ptr, self_ptr, idx_ptr, weight_ptr, floor_ptr, loss_ptr, grad_dots_ptr, grad_self_ptr,
    M, K, N, inv_temperature, eps_sq,
    HAS_FLOOR: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < M
    slots = tl.arange(0, BLOCK_K)
    cols = tl.arange(0, BLOCK_N)
    slot_ok = slots < K
    col_ok = cols < N
    rs = row_ok[:, None] & slot_ok[None, :]  # [T, K]
    rc = row_ok[:, None] & col_ok[None, :]  # [T, N]
    rsc = rs[:, :, None] & col_ok[None, None, :]  # [T, K, N]

    weight = tl.load(weight_ptr + rows, mask=row_ok, other=0.0)
    if HAS_FLOOR:
        floor = tl.load(floor_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    else:
        floor = tl.zeros((BLOCK_T,), dtype=tl.float32)
    idx = tl.load(idx_ptr + rows[:, None] * K + slots[None, :], mask=rs, other=-1)  # [T, K]

    # floored norms of every expert, and of each anchor (read again at its index)
    q = tl.load(self_ptr + rows[:, None] * N + cols[None, :], mask=rc, other=1.0).to(tl.float32)
    root = tl.sqrt(tl.maximum(q, eps_sq))
    norm = tl.maximum(root, floor[:, None])
    q_a = tl.load(self_ptr + rows[:, None] * N + idx, mask=rs, other=1.0).to(tl.float32)
    norm_a = tl.maximum(tl.sqrt(tl.maximum(q_a, eps_sq)), floor[:, None])

    offsets = rows[:, None, None] * (K * N) + slots[None, :, None] * N + cols[None, None, :]
    d = tl.load(dots_ptr + offsets, mask=rsc, other=0.0).to(tl.float32)
    cosine = d / (norm_a[:, :, None] * norm[:, None, :])
    sim = cosine * inv_temperature

    is_anchor = idx[:, :, None] == cols[None, None, :]  # [T, K, N]
    active = tl.sum(is_anchor.to(tl.int32), axis=1) > 0  # [T, N]: the token's top-k
    candidate = rsc & (is_anchor == 0)
    positive = candidate & active[:, None, :]

    # masked logits get a finite "minus infinity" (-1e30), so rows with nothing in them stay finite
    sim_c = tl.where(candidate, sim, -1.0e30)
    max_c = tl.max(sim_c, axis=2)
    exp_c = tl.where(candidate, tl.exp(sim_c - max_c[:, :, None]), 0.0)
    sum_c = tl.sum(exp_c, axis=2)
    sim_p = tl.where(positive, sim, -1.0e30)
    max_p = tl.max(sim_p, axis=2)
    exp_p = tl.where(positive, tl.exp(sim_p - max_p[:, :, None]), 0.0)
    sum_p = tl.sum(exp_p, axis=2)
    sum_c = tl.where(rs, sum_c, 1.0)
    sum_p = tl.where(rs, sum_p, 1.0)
    per_slot = (max_c + tl.log(sum_c)) - (max_p + tl.log(sum_p))
    per_token = tl.sum(tl.where(rs, per_slot, 0.0), axis=1) / K
    tl.store(loss_ptr + rows, weight * per_token, mask=row_ok)

    # d loss / d sim = weight / K * (softmax over candidates - softmax over positives)
    scale = weight / K
    grad_sim = (exp_c / sum_c[:, :, None] - exp_p / sum_p[:, :, None]) * scale[:, None, None]
    grad_cos = tl.where(rsc, grad_sim * inv_temperature, 0.0)
    grad_d = grad_cos / (norm_a[:, :, None] * norm[:, None, :])
    tl.store(grad_dots_ptr + offsets, grad_d.to(grad_dots_ptr.dtype.element_ty), mask=rsc)

    # through the norms: c = D / (norm_a norm_j), so dc/dnorm_j = -c / norm_j and dc/dnorm_a = -c / norm_a
    pull = -grad_cos * cosine
    grad_norm = tl.sum(pull, axis=1) / norm  # [T, N] as a column
    grad_norm_a = tl.sum(pull, axis=2) / norm_a  # [T, K] as an anchor row
    grad_norm += tl.sum(tl.where(is_anchor, grad_norm_a[:, :, None], 0.0), axis=1)
    # torch's subgradients: max(root, floor) splits a tie in half; clamp_min(q, eps^2) passes q >= eps^2
    share = tl.where(root > floor[:, None], 1.0, tl.where(root == floor[:, None], 0.5, 0.0))
    grad_q = tl.where(q >= eps_sq, grad_norm * share * 0.5 / root, 0.0)
    grad_self_at = grad_self_ptr + rows[:, None] * N + cols[None, :]
    tl.store(grad_self_at, grad_q.to(grad_self_ptr.dtype.element_ty), mask=rc)


COMOE_INFONCE = jit(_comoe_infonce_kernel)


class FusedComoeInfoNCE(torch.autograd.Function):
    """Per-token weighted CoMoE InfoNCE [M] from anchor dots [M, k, n] and squared norms [M, n], with
    indices [M, k], weights [M] and floor [M] (or None); gradients for the dots and the norms only."""

    @staticmethod
    def forward(
        ctx,
        anchor_dots: torch.Tensor,
        self_dots: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor,
        floor: torch.Tensor | None,
        temperature: float,
        block_t: int,
    ) -> torch.Tensor:
        rows, k, n = anchor_dots.shape
        anchor_dots, self_dots = anchor_dots.contiguous(), self_dots.contiguous()
        losses = torch.zeros(rows, dtype=torch.float32, device=anchor_dots.device)
        grad_dots = torch.zeros_like(anchor_dots)
        grad_self = torch.zeros_like(self_dots)
        if rows:
            COMOE_INFONCE[(-(-rows // block_t),)](
                anchor_dots, self_dots, indices.contiguous(), weights.float().contiguous(),
                floor if floor is not None else weights, losses, grad_dots, grad_self,
                rows, k, n, 1.0 / temperature, NORMALIZE_EPS**2,
                HAS_FLOOR=floor is not None, BLOCK_T=block_t, BLOCK_K=next_power_of_2(k),
                BLOCK_N=next_power_of_2(n),
            )  # fmt: skip
        ctx.save_for_backward(grad_dots, grad_self)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):  # type: ignore[override]
        grad_dots, grad_self = ctx.saved_tensors
        scale = grad_losses.to(grad_dots.dtype)
        return grad_dots * scale[:, None, None], grad_self * scale[:, None], None, None, None, None, None


def every_anchor_and_negative(anchor: str, num_negatives: int | None, n: int, k: int) -> bool:
    """Whether a CoMoE setting is the one the fused kernel computes: every activated expert an anchor
    (`anchor: all`), every inactive expert a negative (`num_negatives` None or >= n - k), k >= 2."""
    all_negatives = num_negatives is None or num_negatives >= n - k
    return anchor == "all" and all_negatives and k >= 2


def fused_comoe_applies(device_type: str, anchor: str, num_negatives: int | None, n: int, k: int) -> bool:
    """Whether the CoMoE objective takes the fused kernel: on CUDA with Triton installed, for every anchor
    (`anchor: all`) and every inactive expert as a negative, k >= 2; the torch path otherwise."""
    fused_setting = every_anchor_and_negative(anchor, num_negatives, n, k)
    return TRITON_AVAILABLE and device_type == "cuda" and fused_setting


def fused_comoe_loss(
    anchor_dots: torch.Tensor,
    self_dots: torch.Tensor,
    indices: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
    floor: torch.Tensor | None = None,
    block_t: int = BLOCK_T,
) -> torch.Tensor:
    """CoMoE's InfoNCE (arXiv 2505.17553, Algorithm 1; all anchors, all inactive experts as negatives),
    the mean over real tokens, from dot products (module docstring): anchor_dots [..., T, k, n], self_dots
    [..., T, n] (in the same units, e.g. output-space / scaling^2), indices [..., T, k] (distinct, in
    [0, n) for real tokens; padding rows may hold anything), mask [..., T] bool or None, floor [..., T] or
    None (norm floor in the same units' square root). Returns [...] float32, differentiable in the dots.

    ValueError for k < 2, temperature <= 0, mismatched shapes, block_t not a power of two, or where the
    kernel cannot run (comoe.moe.triton_jit.runnable).
    """
    why_not = runnable(anchor_dots.device.type)
    if why_not is not None:
        raise ValueError(f"the fused CoMoE InfoNCE: {why_not}")
    *lead, num_tokens, k, n = anchor_dots.shape
    if tuple(self_dots.shape) != (*lead, num_tokens, n) or tuple(indices.shape) != (*lead, num_tokens, k):
        raise ValueError(
            f"anchor_dots [..., T, k, n] {tuple(anchor_dots.shape)}, self_dots [..., T, n] "
            f"{tuple(self_dots.shape)} and indices [..., T, k] {tuple(indices.shape)} disagree"
        )
    if k < 2:
        raise ValueError(f"comoe_loss needs k >= 2 activated experts per token (for positives), got k={k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if block_t < 1 or block_t != next_power_of_2(block_t):
        raise ValueError(f"block_t={block_t} must be a power of two")
    valid = valid_mask(mask, (*lead, num_tokens), anchor_dots.device)
    # padding rows get a well-formed row of indices (the torch path does the same) and weight 0
    indices = torch.where(valid.unsqueeze(-1), indices, torch.arange(k, device=indices.device))
    weights = valid.float() / valid.sum(-1, keepdim=True).clamp_min(1)
    flat_floor = None if floor is None else floor.float().reshape(-1).contiguous()
    losses = FusedComoeInfoNCE.apply(
        anchor_dots.reshape(-1, k, n),
        self_dots.reshape(-1, n),
        indices.reshape(-1, k),
        weights.reshape(-1),
        flat_floor,
        float(temperature),
        block_t,
    )
    return losses.view(*lead, num_tokens).sum(-1)
