"""Cosines between expert outputs from Gram matrices: the fast path of every contrastive objective.

Contrastive objectives only need cosines between expert outputs e_i = s * B_i A_i x. With z_i = A_i x
(already computed for every expert by the layer) and the Gram blocks G_ij = B_i B_j^T (r x r, once per
step and independent of tokens), e_i . e_j = s^2 z_i^T G_ij z_j exactly, at O(n^2 r^2) per token instead
of materialising n outputs of size d_out. Tested against cosines of materialised outputs. Every function
takes optional leading dimensions [...] (adapted layers of one shape stacked, with their Gram matrices
[..., n*r, n*r]), so an objective runs once for a group of layers.
"""

from __future__ import annotations

import torch

from comoe.objectives.cosine import floored_norms


def one_hot(indices: torch.Tensor, classes: int, dtype: torch.dtype) -> torch.Tensor:
    """F.one_hot(indices, classes) in `dtype`, by a scatter: F.one_hot checks the indices' range on the
    host, a device sync per call (two per adapted layer and step on a GPU). Indices come from topk."""
    return torch.zeros(*indices.shape, classes, dtype=dtype, device=indices.device).scatter_(
        -1, indices.unsqueeze(-1), 1
    )


def cosines_from_dots(dots: torch.Tensor, floor: torch.Tensor | None = None) -> torch.Tensor:
    """Cosines from a matrix of dot products, normalising as normalize_with_floor does."""
    norms = floored_norms(dots.diagonal(dim1=-2, dim2=-1), floor)
    return dots / (norms.unsqueeze(-1) * norms.unsqueeze(-2))


def anchor_cosines(
    z: torch.Tensor, indices: torch.Tensor, gram: torch.Tensor, floor: torch.Tensor | None = None
) -> torch.Tensor:
    """[..., T, k, n] cosines between each token's active experts (rows) and all n experts (columns), from
    z [..., T, n, r], indices [..., T, k], gram [..., n*r, n*r] and floor [..., T].

    Only the k anchor rows of each token's n x n cosine matrix are needed. The anchor's z is placed in
    its expert's r-block of an n*r vector (zeros elsewhere), so all k rows of dot products come from one
    dense [T*k, n*r] x [n*r, n*r] matmul with the Gram matrix and an r-wide reduction: no sort, gather
    or scatter, which cost more than the extra FLOPs on the zero blocks. `floor` [T]: per-token norm floor
    in z-space (output-space floor / scaling), see normalize_with_floor.
    """
    dots, self_dots = anchor_dots(z, indices, gram)
    floor = None if floor is None else floor.unsqueeze(-1)
    norms = floored_norms(self_dots, floor)  # [..., T, n]
    anchor_norms = norms.gather(-1, indices)  # [..., T, k]
    return dots / (anchor_norms.unsqueeze(-1) * norms.unsqueeze(-2))


def anchor_dots(
    z: torch.Tensor, indices: torch.Tensor, gram: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dot products behind anchor_cosines, in float32 and z-space (output space / scaling^2): [..., T,
    k, n] between each token's active experts and all n experts, and [..., T, n] each expert's squared
    norm (the fused kernel of comoe.objectives.triton_infonce takes these)."""
    num_tokens, n, r = z.shape[-3:]
    lead = tuple(z.shape[:-3])
    k = indices.shape[-1]
    z = z.float()
    anchor_blocks = one_hot(indices, n, z.dtype).unsqueeze(-1)  # [..., T, k, n, 1]
    placed = (anchor_blocks * z.unsqueeze(-3)).view(*lead, num_tokens * k, n * r)
    dots = ((placed @ gram).view(*lead, num_tokens, k, n, r) * z.unsqueeze(-3)).sum(-1)  # [..., T, k, n]
    return dots, _block_self_dots(z, gram)


def _block_self_dots(z: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """|e_j|^2 / s^2 = z_j G_jj z_j for every token and expert [..., T, n]: one batched matmul."""
    n, r = z.shape[-2:]
    lead = tuple(z.shape[:-3])
    blocks = gram.view(*lead, n, r, n, r).diagonal(dim1=-4, dim2=-2)  # [..., r, r, n]: G_jj
    diagonal = blocks.movedim(-1, -3)  # [..., n, r, r]
    zt = z.transpose(-3, -2)  # [..., n, T, r]
    return ((zt @ diagonal) * zt).sum(-1).transpose(-1, -2)


def item_cosines(
    z_items: torch.Tensor, experts: torch.Tensor, gram: torch.Tensor, floor: torch.Tensor | None = None
) -> torch.Tensor:
    """[..., N, N] cosines between N (token, expert) outputs given their z rows [..., N, r], expert ids
    [..., N], gram [..., n*r, n*r] and floor [..., N].

    Each item is placed in its expert's block of an n*r vector, so all dot products are Zhat G Zhat^T.
    """
    n = gram.shape[-1] // z_items.shape[-1]
    placed = one_hot(experts, n, torch.float32).unsqueeze(-1) * z_items.float().unsqueeze(-2)
    placed = placed.flatten(-2)  # [..., N, n*r]
    return cosines_from_dots(placed @ gram @ placed.transpose(-1, -2), floor)
