"""The router z-loss (ST-MoE, Zoph et al. 2022, arXiv 2202.08906, eq. 5): the fast path of the `router_z`
objective, and its registration.

    L_z = mean over real tokens of ( logsumexp_i (W_g x)_i )^2

It keeps the router's logits small, so the softmax stays where float32 (and bf16) rounding is harmless;
ST-MoE weights it by 1e-3. It needs the logits themselves ("logits" in the objective's needs): the
probabilities are invariant to a shift of the logits and have lost their logsumexp. Turn it on with
`aux_objectives: {router_z: 0.001}`; it is logged as the component `router_z`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from comoe.config import ComoeConfig
from comoe.moe.record import LayerRecord
from comoe.objectives.infonce import valid_mask
from comoe.objectives.registry import Objective, register_objective, stacked


def router_z_loss(router_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over real tokens of logsumexp(logits)^2, in float32 at least.

    Padding tokens are weighted out rather than indexed out (no host synchronisation on a GPU); with no
    real token the result is a zero connected to the logits. Shapes: ``router_logits`` [..., T, n], ``mask``
    [..., T] bool; returns [...] (a scalar without leading dimensions).
    Tested against ``comoe.objectives.reference.router_z_loss``.
    """
    if router_logits.dim() < 2:
        raise ValueError(f"router_logits must have shape (T, n), got {tuple(router_logits.shape)}")
    half = router_logits.dtype in (torch.float16, torch.bfloat16)
    logits = router_logits.float() if half else router_logits
    weights = valid_mask(mask, logits.shape[:-1], logits.device).to(logits.dtype)
    squared = torch.logsumexp(logits, dim=-1).square()
    return (squared * weights).sum(-1) / weights.sum(-1).clamp_min(1)


def router_z_objective(record: LayerRecord, config: ComoeConfig) -> Tensor:
    """One layer's router z-loss over its real tokens."""
    if record.logits is None:
        raise ValueError("router_z needs the router's logits: the layer kept none (built without router_z)")
    return router_z_loss(record.logits, record.mask)


def router_z_batched(records: list[LayerRecord], config: ComoeConfig) -> Tensor:
    """`router_z_objective` of every record of one group at once, [L]."""
    logits = stacked(records, lambda record: record.logits)
    if logits is None:
        return router_z_objective(records[0], config)  # raises: no logits kept
    return router_z_loss(logits, stacked(records, lambda record: record.mask))


ROUTER_Z = register_objective(
    Objective(
        "router_z",
        router_z_objective,
        component="router_z",
        batched_loss=router_z_batched,
        needs=frozenset({"logits"}),
        description="ST-MoE router z-loss: mean of logsumexp(router logits)^2 (weight 1e-3 in the paper)",
    )
)
