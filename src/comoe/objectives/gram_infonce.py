"""CoMoE's InfoNCE from the experts' down-projections and Gram matrices in one autograd Function (torch
ops, every device): the objective's fast path wherever the Triton kernel does not run.

Per token, with z_i = A_i x ([..., T, n, r]) and the Gram matrix G = B B^T ([..., n*r, n*r], blocks
G_ij = B_i B_j^T), two expert outputs have the dot product (in z-space: output space / scaling^2)

    D_ij = z_i^T G_ij z_j                                   (comoe.objectives.gram)

The k anchors' rows D_aj come from one batched matmul per layer group (each anchor's z placed in its
expert's r-block of an n*r row, times G), the squared norms q_j = D_jj from one over layers x experts with
the diagonal blocks G_jj. Then, exactly as comoe.objectives.triton_infonce's kernel:

    norm_j = max(sqrt(max(q_j, eps^2)), floor_t),   c_aj = D_aj / (norm_a norm_j),   sim = c / temperature
    loss_a = logsumexp_{j != a} sim_aj - logsumexp_{j active, j != a} sim_aj

the token's loss is the mean over its k anchors (or one drawn anchor, `anchor: random`; the candidates
are the positives and a drawn subset of the negatives with `num_negatives`), the result the mean over real
tokens per leading index: CoMoE's InfoNCE (arXiv 2505.17553, Algorithm 1), equal to
`comoe_loss_from_anchor_cosines` of `anchor_cosines` with the same draws (tested in value and every
gradient). The forward also derives d loss / d D and d loss / d q by hand (the softmax differences through
the cosines and the floored norms, torch's subgradients at the clamps included); backward takes them to z
and G with two batched matmuls each and a few products. Against the autograd path this dispatches about
half of the objective's ops (benchmarks/bench_dispatch.py) at the same arithmetic
(benchmarks/bench_objectives.py).
"""

from __future__ import annotations

import contextlib

import torch

from comoe.objectives.cosine import NORMALIZE_EPS
from comoe.objectives.infonce import draw_anchors_and_negatives, sampled_negatives, valid_mask

__all__ = ["GramComoeInfoNCE", "gram_comoe_loss", "work_dtype"]


def work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the Function computes in: float64 when an input is float64 (gradcheck), else float32."""
    return torch.float64 if any(tensor.dtype == torch.float64 for tensor in tensors) else torch.float32


def without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """A block where torch.autocast does not recast ops on `device` (a no-op where autocast does not
    exist, e.g. the meta device)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class GramComoeInfoNCE(torch.autograd.Function):
    """[L] CoMoE InfoNCE from z [L, T, n, r], gram [L, n*r, n*r] (symmetric), the active experts' indices
    [L, T, k] (distinct, in range: padding rows already made well-formed), each anchor's weight [L, T, k]
    (or [L, T, 1] for all alike; zero for anchors not drawn and padding), the negatives [L, T, n] bool
    (None: every inactive expert), floor [L, T] or None; gradients for z and gram (module docstring).
    Computed in float32, or float64 for float64 inputs."""

    @staticmethod
    def forward(
        ctx,
        z: torch.Tensor,
        gram: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor,
        negatives: torch.Tensor | None,
        floor: torch.Tensor | None,
        temperature: float,
    ) -> torch.Tensor:
        layers, tokens, n, r = z.shape
        k = indices.shape[-1]
        ctx.dtypes = (z.dtype, gram.dtype)
        work = work_dtype(z, gram)
        with without_autocast(z.device):
            z, gram = z.to(work), gram.to(work)
            # each anchor's z in its expert's r-block of an n*r row: all anchors' rows of G in one bmm
            is_anchor = torch.zeros(layers, tokens, k, n, dtype=work, device=z.device)
            is_anchor.scatter_(-1, indices.unsqueeze(-1), 1.0)  # [L, T, k(s), n(j)]: j == a_s
            placed = (is_anchor.unsqueeze(-1) * z.unsqueeze(2)).view(layers, tokens * k, n * r)
            rows = torch.bmm(placed, gram).view(layers, tokens, k, n, r)  # z_a^T G_aj
            dots = (rows * z.unsqueeze(2)).sum(-1)  # [L, T, k, n]: D_aj = z_a^T G_aj z_j
            # every expert's squared norm q_j = z_j^T G_jj z_j: one bmm over layers x experts
            zt = z.transpose(1, 2).reshape(layers * n, tokens, r)  # [L*n, T, r]
            blocks = gram.view(layers, n, r, n, r).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # G_jj
            own = torch.bmm(zt, blocks.reshape(layers * n, r, r))  # [L*n, T, r]: G_jj z_j
            squared = (own * zt).sum(-1).view(layers, n, tokens).transpose(1, 2)  # [L, T, n]
            root = squared.clamp_min(NORMALIZE_EPS**2).sqrt()
            floor_t = None if floor is None else floor.to(work).unsqueeze(-1)
            norms = root if floor_t is None else torch.maximum(root, floor_t)
            anchor_norms = norms.gather(-1, indices)  # [L, T, k]
            scale = (anchor_norms.unsqueeze(-1) * norms.unsqueeze(-2)).mul_(temperature)  # sim = D / scale
            sim = dots / scale
            anchor_mask = is_anchor.bool()
            active = anchor_mask.any(-2, keepdim=True)  # [L, T, 1, n]
            outside = anchor_mask if negatives is None else anchor_mask | ~(active | negatives.unsqueeze(-2))
            candidates = sim.masked_fill(outside, float("-inf"))  # the anchor's positives and negatives
            positives = sim.masked_fill(anchor_mask | ~active, float("-inf"))  # the other active j
            log_den = candidates.logsumexp(-1)  # [L, T, k]
            log_num = positives.logsumexp(-1)
            weights = weights.to(work)  # [L, T, k]: each anchor's share of the loss
            loss = ((log_den - log_num) * weights).sum((-2, -1))
            # d loss / d sim = the anchor's weight (softmax over candidates - softmax over positives)
            grad_sim = (candidates - log_den.unsqueeze(-1)).exp_()
            grad_sim -= (positives - log_num.unsqueeze(-1)).exp_()
            grad_sim.mul_(weights.unsqueeze(-1))
            # sim = D / (t norm_a norm_j): through each anchor's norm and each column's, then the clamps'
            pull = grad_sim * sim
            grad_norms = pull.sum(-2).scatter_add_(-1, indices, pull.sum(-1))  # [L, T, n], negated
            grad_norms.div_(norms)
            factor = -0.5 if floor_t is None else -0.25  # d root / d q = 0.5 / root; the floor's share below
            grad_squared = grad_norms.div_(root).mul_(factor).masked_fill_(squared < NORMALIZE_EPS**2, 0)
            if floor_t is not None:  # d max(root, floor) / d root: 1, 0.5 at a tie (as torch.maximum), 0
                grad_squared *= (root - floor_t).sign_().add_(1)
            grad_dots = grad_sim.div_(scale)
        ctx.save_for_backward(z, gram, is_anchor, placed, rows, zt, own, grad_dots, grad_squared)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        z, gram, is_anchor, placed, rows, zt, own, grad_dots, grad_squared = ctx.saved_tensors
        layers, tokens, n, r = z.shape
        k = is_anchor.shape[2]
        grad_z = grad_gram = None
        with without_autocast(z.device):
            scale = grad_loss.to(z.dtype).view(layers, 1, 1)
            grad_dots = (grad_dots * scale.unsqueeze(-1)).unsqueeze(-1)  # [L, T, k, n, 1]
            grad_squared = grad_squared * scale  # [L, T, n]
            grad_rows = (grad_dots * z.unsqueeze(2)).view(layers, tokens * k, n * r)  # d/d (z_a^T G_aj)
            if ctx.needs_input_grad[0]:
                # D_aj = z_a^T G_aj z_j: z_j's share from the rows, z_a's back through the placement
                grad_z = (grad_dots * rows).sum(2)  # [L, T, n, r]
                grad_placed = torch.bmm(grad_rows, gram).view(layers, tokens, k, n, r)  # G symmetric
                grad_z += (grad_placed * is_anchor.unsqueeze(-1)).sum(2)
                # q_j = z_j^T G_jj z_j: 2 G_jj z_j per unit of q_j
                own_grad = own.view(layers, n, tokens, r) * grad_squared.transpose(1, 2).unsqueeze(-1)
                grad_z += own_grad.transpose(1, 2).mul(2)
                grad_z = grad_z.to(ctx.dtypes[0])
            if ctx.needs_input_grad[1]:
                grad_gram = torch.bmm(placed.transpose(1, 2), grad_rows)  # sum over tokens, anchors
                weighted = zt * grad_squared.transpose(1, 2).reshape(layers * n, tokens, 1)
                grad_blocks = torch.bmm(weighted.transpose(1, 2), zt).view(layers, n, r, r)  # sum_t q' z z^T
                diagonal = grad_gram.view(layers, n, r, n, r).diagonal(dim1=1, dim2=3)  # [L, r, r, n]
                diagonal += grad_blocks.permute(0, 2, 3, 1)
                grad_gram = grad_gram.to(ctx.dtypes[1])
        return grad_z, grad_gram, None, None, None, None, None


def gram_comoe_loss(
    z: torch.Tensor,
    indices: torch.Tensor,
    gram: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
    floor: torch.Tensor | None = None,
    anchor: str = "all",
    num_negatives: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """CoMoE's InfoNCE (arXiv 2505.17553, Algorithm 1), the mean over real tokens, from z [..., T, n, r]
    (any float dtype), the top-k indices [..., T, k] (distinct, in [0, n) for real tokens; padding rows may
    hold anything), the symmetric Gram matrices gram [..., n*r, n*r], mask [..., T] bool or None and floor
    [..., T] (the norm floor in z-space: output-space floor / scaling) or None; `anchor` ("all" activated
    experts, or one "random" per token), `num_negatives` (None: every inactive expert) and `generator` as
    `comoe_loss` takes them, drawn in its order (infonce.draw_anchors_and_negatives). Returns [...]
    float32, differentiable in z and gram: `comoe_loss_from_anchor_cosines(anchor_cosines(z, indices,
    gram, floor), ...)` in one Function.

    ValueError for k < 2, an unknown anchor, temperature <= 0, or shapes that disagree.
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
    if anchor not in ("all", "random"):
        raise ValueError(f"anchor must be 'all' or 'random', got {anchor!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    layers = 1
    for size in lead:
        layers *= size
    slots, negative_keys = draw_anchors_and_negatives(
        (*lead, tokens), n, k, anchor, num_negatives, generator, z.device
    )
    valid = valid_mask(mask, (*lead, tokens), z.device).view(layers, tokens)
    # padding rows get a well-formed set of experts (0..k-1) and weight 0, as the torch path does
    well_formed = torch.arange(k, device=z.device)
    indices = torch.where(valid.unsqueeze(-1), indices.view(layers, tokens, k), well_formed)
    count = valid.sum(-1, keepdim=True).clamp_min(1)
    weights = valid.to(work_dtype(z, gram)) / count  # [L, T]
    if slots is None:  # every activated expert an anchor, each 1/k of its token
        weights = (weights / k).unsqueeze(-1)
    else:  # the drawn slot's anchor carries the token
        weights = torch.zeros(layers, tokens, k, dtype=weights.dtype, device=z.device).scatter_(
            -1, slots.view(layers, tokens, 1), weights.unsqueeze(-1)
        )
    negatives = None
    if negative_keys is not None:
        active = torch.zeros(layers, tokens, n, dtype=torch.bool, device=z.device).scatter_(-1, indices, True)
        negatives = sampled_negatives(active, negative_keys.view(layers, tokens, -1), num_negatives)
    flat_floor = None if floor is None else floor.reshape(layers, tokens)
    loss = GramComoeInfoNCE.apply(
        z.reshape(layers, tokens, n, r), gram.reshape(layers, n * r, n * r), indices, weights, negatives,
        flat_floor, float(temperature),
    )  # fmt: skip
    return loss.view(lead)
