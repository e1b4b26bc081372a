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
    """[T, k, n] cosines between each token's active experts (rows, ``indices`` [T, k]) and all n experts
    (columns), from materialised expert outputs ``outputs`` [T, n, d], in float32 at least; ``floor`` [T]
    per-token norm floor in output space (see normalize_with_floor). The k rows of the reference's [T, n, n]
    matrix (``reference.cosine_similarity_matrix``), one [k, d] x [d, n] product per token."""
    unit = normalize_with_floor(
        outputs.to(torch.promote_types(outputs.dtype, torch.float32)),
        floor=None if floor is None else floor.unsqueeze(-1),
    )
    anchors = unit.gather(1, indices.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))  # [T, k, d]
    return anchors @ unit.transpose(1, 2)


def output_item_cosines(items: Tensor, floor: Tensor | None = None) -> Tensor:
    """[N, N] cosines between N materialised (token, expert) outputs ``items`` [N, d], in float32 at least;
    ``floor`` [N] per-item norm floor in output space."""
    unit = normalize_with_floor(items.to(torch.promote_types(items.dtype, torch.float32)), floor=floor)
    return unit @ unit.t()
