"""CoMoE's InfoNCE from the experts' down-projections and Gram matrices in one autograd Function (torch
ops, every device): the default setting's fast path where the Triton kernel does not run.

Per token, with z_i = A_i x ([..., T, n, r]) and the Gram matrix G = B B^T ([..., n*r, n*r], blocks
G_ij = B_i B_j^T), every pair of expert outputs has the dot product (in z-space: output space / scaling^2)

    D_ij = z_i^T G_ij z_j                                   (comoe.objectives.gram)

computed here for all n x n pairs in one batched matmul per layer group (the anchors' rows and the squared
norms q_j = D_jj alike). From D, exactly as comoe.objectives.triton_infonce's kernel:

    norm_j = max(sqrt(max(q_j, eps^2)), floor_t),   c_ij = D_ij / (norm_i norm_j),   sim = c / temperature
    loss_i = logsumexp_{j != i} sim_ij - logsumexp_{j active, j != i} sim_ij       for each active i

the token's loss is the mean over its k active experts (the anchors), the result the mean over real
tokens per leading index: CoMoE's InfoNCE (arXiv 2505.17553, Algorithm 1) with every activated expert as an
anchor and every inactive expert as a negative (`anchor: all`, `num_negatives: null`), equal to
`comoe_loss_from_anchor_cosines` of `anchor_cosines` (tested in value and every gradient). The forward
also derives d loss / d D by hand (the softmax differences through the cosines and the floored norms,
torch's subgradients at the clamps included); backward takes it to z and G with two batched matmuls each.
Against the autograd path this dispatches about a third of the ops (benchmarks/bench_dispatch.py) and
keeps no [T, k, n, r] intermediates for backward, only d loss / d D [..., T, n, n].
"""

from __future__ import annotations

import contextlib

import torch

from comoe.objectives.cosine import NORMALIZE_EPS
from comoe.objectives.infonce import valid_mask

__all__ = ["GramComoeInfoNCE", "every_anchor_and_negative", "gram_comoe_loss"]


def every_anchor_and_negative(anchor: str, num_negatives: int | None, n: int, k: int) -> bool:
    """Whether a CoMoE setting is the one the fused paths compute: every activated expert an anchor
    (`anchor: all`), every inactive expert a negative (`num_negatives` None or >= n - k), k >= 2."""
    all_negatives = num_negatives is None or num_negatives >= n - k
    return anchor == "all" and all_negatives and k >= 2


def without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """A block where torch.autocast does not recast ops on `device` (a no-op where autocast does not
    exist, e.g. the meta device)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class GramComoeInfoNCE(torch.autograd.Function):
    """[L] CoMoE InfoNCE from z [L, T, n, r], gram [L, n*r, n*r] (symmetric), the active experts as a
    bool mask [L, T, n] with k per token, token weights [L, T], floor [L, T] or None; gradients for z
    and gram (module docstring). Computed in float32, or float64 for float64 inputs."""

    @staticmethod
    def forward(
        ctx,
        z: torch.Tensor,
        gram: torch.Tensor,
        active: torch.Tensor,
        weights: torch.Tensor,
        floor: torch.Tensor | None,
        temperature: float,
        k: int,
    ) -> torch.Tensor:
        layers, tokens, n, r = z.shape
        work = torch.float64 if torch.float64 in (z.dtype, gram.dtype) else torch.float32
        with without_autocast(z.device):
            # z_i^T G_ij for every i (one bmm over layers x experts), then the r-wide products with z_j
            zt = z.to(work).transpose(1, 2).reshape(layers * n, tokens, r)  # [L*n, T, r]
            gram = gram.to(work)
            rows = torch.bmm(zt, gram.view(layers * n, r, n * r))  # [L*n, T, n*r]
            z_cols = zt.view(layers, 1, n, tokens, r).transpose(2, 3)  # [L, 1, T, n, r] as z_j
            dots = (rows.view(layers, n, tokens, n, r) * z_cols).sum(-1).transpose(1, 2)  # [L, T, n(i), n(j)]
            squared = dots.diagonal(dim1=-2, dim2=-1)  # [L, T, n] q_j
            root = squared.clamp_min(NORMALIZE_EPS**2).sqrt()
            floor_t = None if floor is None else floor.to(work).unsqueeze(-1)
            norms = root if floor_t is None else torch.maximum(root, floor_t)
            scale = (norms.unsqueeze(-1) * norms.unsqueeze(-2)).mul_(temperature)  # sim = D / scale
            sim = dots / scale
            itself = torch.eye(n, dtype=torch.bool, device=z.device)  # j == i: never a candidate of anchor i
            not_positive = itself | ~active.unsqueeze(-2)  # [L, T, n, n]: all but the active j != i
            candidates = sim.masked_fill(itself, float("-inf"))
            positives = sim.masked_fill(not_positive, float("-inf"))
            log_den = candidates.logsumexp(-1)  # [L, T, n]
            log_num = positives.logsumexp(-1)
            coefficient = active * weights.to(work).unsqueeze(-1)  # [L, T, n] k * weight of each anchor
            loss = ((log_den - log_num) * coefficient).sum((-2, -1)) / k
            # d loss / d sim = coefficient_i / k (softmax over candidates - softmax over positives)
            grad_sim = (candidates - log_den.unsqueeze(-1)).exp_()
            grad_sim -= (positives - log_num.unsqueeze(-1)).exp_()
            grad_sim.mul_(coefficient.unsqueeze(-1) / k)
            # sim = D / (t norm_i norm_j): through the norms of rows and columns, then the clamps'
            pull = grad_sim * sim
            grad_norms = (pull.sum(-1) + pull.sum(-2)).div_(norms)  # [L, T, n], negated
            factor = -0.5 if floor_t is None else -0.25  # d root / d q = 0.5 / root; the floor's share below
            grad_squared = grad_norms.div_(root).mul_(factor).masked_fill_(squared < NORMALIZE_EPS**2, 0)
            if floor_t is not None:  # d max(root, floor) / d root: 1, 0.5 at a tie (as torch.maximum), 0
                grad_squared *= (root - floor_t).sign_().add_(1)
            grad_dots = grad_sim.div_(scale)
            grad_dots.diagonal(dim1=-2, dim2=-1).add_(grad_squared)
        ctx.save_for_backward(zt, gram, grad_dots)
        ctx.shape = (layers, tokens, n, r)
        ctx.dtypes = (z.dtype, gram.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        zt, gram, grad_dots = ctx.saved_tensors
        layers, tokens, n, r = ctx.shape
        grad_z = grad_gram = None
        with without_autocast(zt.device):
            grad = grad_dots * grad_loss.to(grad_dots.dtype).view(layers, 1, 1, 1)  # [L, T, n(i), n(j)]
            z_cols = zt.view(layers, 1, n, tokens, r).transpose(2, 3)  # [L, 1, T, n, r]
            blocks = gram.view(layers * n, r, n * r)  # block-row i of G: [G_i1 ... G_in]
            if ctx.needs_input_grad[0]:
                # d/dz_m = sum_j (g_mj + g_jm) G_mj z_j (G symmetric): row m of G times [s_mj z_j]_j
                both = (grad + grad.transpose(-1, -2)).transpose(1, 2).unsqueeze(-1)  # [L, m, T, j, 1]
                weighted = (both * z_cols).reshape(layers * n, tokens, n * r)
                grad_z = torch.bmm(weighted, blocks.transpose(1, 2)).view(layers, n, tokens, r)
                grad_z = grad_z.transpose(1, 2).to(ctx.dtypes[0])
            if ctx.needs_input_grad[1]:
                # d/dG_ij = sum_t g_ij z_i z_j^T: for each i, z_i^T [r, T] times [g_ij z_j]_j [T, n*r]
                weighted = (grad.transpose(1, 2).unsqueeze(-1) * z_cols).reshape(layers * n, tokens, n * r)
                grad_gram = torch.bmm(zt.transpose(1, 2), weighted).view(layers, n * r, n * r)
                grad_gram = grad_gram.to(ctx.dtypes[1])
        return grad_z, grad_gram, None, None, None, None, None


def gram_comoe_loss(
    z: torch.Tensor,
    indices: torch.Tensor,
    gram: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
    floor: torch.Tensor | None = None,
) -> torch.Tensor:
    """CoMoE's InfoNCE (arXiv 2505.17553, Algorithm 1; every activated expert an anchor, every inactive
    expert a negative), the mean over real tokens, from z [..., T, n, r] (any float dtype), the top-k
    indices [..., T, k] (distinct, in [0, n) for real tokens; padding rows may hold anything), the
    symmetric Gram matrices gram [..., n*r, n*r], mask [..., T] bool or None and floor [..., T] (the norm
    floor in z-space: output-space floor / scaling) or None. Returns [...] float32, differentiable in z and
    gram: `comoe_loss_from_anchor_cosines(anchor_cosines(z, indices, gram, floor), ...)` in one Function.

    ValueError for k < 2, temperature <= 0, or shapes that disagree.
    """
    *lead, tokens, n, r = z.shape
    k = indices.shape[-1]
    if tuple(indices.shape) != (*lead, tokens, k) or tuple(gram.shape) != (*lead, n * r, n * r):
        raise ValueError(
            f"z [..., T, n, r] {tuple(z.shape)}, indices [..., T, k] {tuple(indices.shape)} and gram "
            f"[..., n*r, n*r] {tuple(gram.shape)} disagree"
        )
    if not 2 <= k <= n:
        raise ValueError(f"comoe_loss needs 2 <= k <= n={n} activated experts per token, got k={k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    layers = 1
    for size in lead:
        layers *= size
    valid = valid_mask(mask, (*lead, tokens), z.device).view(layers, tokens)
    # padding rows get a well-formed set of experts (0..k-1) and weight 0, as the torch path does
    well_formed = torch.arange(k, device=z.device)
    indices = torch.where(valid.unsqueeze(-1), indices.view(layers, tokens, k), well_formed)
    active = torch.zeros(layers, tokens, n, dtype=torch.bool, device=z.device).scatter_(-1, indices, True)
    count = valid.sum(-1, keepdim=True).clamp_min(1)
    weights = valid / count if torch.float64 not in (z.dtype, gram.dtype) else valid.double() / count
    flat_floor = None if floor is None else floor.reshape(layers, tokens)
    loss = GramComoeInfoNCE.apply(
        z.reshape(layers, tokens, n, r), gram.reshape(layers, n * r, n * r), active, weights, flat_floor,
        float(temperature), k,
    )  # fmt: skip
    return loss.view(lead)
