"""Cosines between expert outputs as every objective takes them: L2 normalisation with an optional floor.

Shared by the reference definitions (cosines of materialised outputs) and the Gram-matrix fast path, so
both normalise identically (``x / max(||x||, eps, floor)``). Also the objectives' path for experts whose
outputs are materialised (a bank whose outputs are not ``s B_i^T z_i``, e.g. DoRA experts): the plain
cosines of only the rows the objectives read.
"""

from __future__ import annotations

import torch
from torch import Tensor

NORMALIZE_EPS = 1e-8
"""Denominator floor for L2 normalisation (``F.normalize`` eps) in every cosine similarity of comoe."""


def normalize_with_floor(x: Tensor, eps: float = NORMALIZE_EPS, floor: Tensor | None = None) -> Tensor:
    """``x / max(||x||, eps, floor)`` along the last dimension; ``floor`` broadcasts to ``x.shape[:-1]``.

    Why a floor: the gradient of ``x / ||x||`` has norm ``1 / ||x||``, so an expert whose output is (near)
    zero -- every expert at initialisation (B = 0), and experts no token was routed to yet -- gives the
    cosines a gradient of up to ``1 / eps = 1e8``. With a floor, a row shorter than it has no direction of
    its own (its "cosines" shrink linearly to 0) and the gradient is at most ``1 / floor``; rows at least as
    long as the floor are normalised exactly as before, so the objective is unchanged there.
    """
    norms = x.norm(dim=-1, keepdim=True).clamp_min(eps)
    if floor is not None:  # broadcastable to x.shape[:-1], e.g. [T, 1] for [T, n, d] outputs
        norms = torch.maximum(norms, floor.to(norms.dtype).unsqueeze(-1))
    return x / norms


def floored_norms(squared: Tensor, floor: Tensor | None) -> Tensor:
    """max(|x|, eps, floor) from squared norms, as normalize_with_floor takes it (floor broadcasts)."""
    norms = squared.clamp_min(NORMALIZE_EPS**2).sqrt()
    return norms if floor is None else torch.maximum(norms, floor.to(norms.dtype))


def output_anchor_cosines(outputs: Tensor, indices: Tensor, floor: Tensor | None = None) -> Tensor:
    """[..., T, k, n] cosines between each token's active experts (rows, ``indices`` [..., T, k]) and all n
    experts (columns), from materialised expert outputs ``outputs`` [..., T, n, d] (leading dimensions: e.g.
    layers stacked), in float32 at least; ``floor`` [..., T] per-token norm floor in output space. The k
    rows of the reference's [T, n, n] matrix (``reference.cosine_similarity_matrix``): all n x n dot
    products in one batched matmul, the norms its diagonal (floored as normalize_with_floor floors them),
    then the anchors' rows, so no [T, n, d] tensor is normalised or gathered (each of those costs a pass
    over T * n * d in the forward and the backward)."""
    work = outputs.to(torch.promote_types(outputs.dtype, torch.float32))
    dots = work @ work.transpose(-1, -2)  # [T, n, n]
    norms = floored_norms(dots.diagonal(dim1=-2, dim2=-1), None if floor is None else floor.unsqueeze(-1))
    cosines = dots / (norms.unsqueeze(-1) * norms.unsqueeze(-2))
    return cosines.gather(-2, indices.unsqueeze(-1).expand(*indices.shape, cosines.shape[-1]))


def output_item_cosines(items: Tensor, floor: Tensor | None = None) -> Tensor:
    """[N, N] cosines between N materialised (token, expert) outputs ``items`` [N, d], in float32 at least;
    ``floor`` [N] per-item norm floor in output space (normalised as normalize_with_floor does)."""
    work = items.to(torch.promote_types(items.dtype, torch.float32))
    dots = work @ work.t()
    norms = floored_norms(dots.diagonal(), floor)
    return dots / (norms.unsqueeze(-1) * norms.unsqueeze(-2))
