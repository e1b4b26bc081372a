"""Cosines between expert outputs as every objective takes them: L2 normalisation with an optional floor.

Shared by the reference definitions (cosines of materialised outputs) and the Gram-matrix fast path, so
both normalise identically (``x / max(||x||, eps, floor)``).
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
