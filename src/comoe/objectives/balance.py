"""Switch load balancing: the fast path of the `balance` objective, and its registration.

The loss of one layer is ``n * sum_i f_i * P_i`` over real tokens (Fedus et al. 2021, eq. 4), with expert
load ``f`` counted on this process (``balance_scope='local'``) or over all processes (``'global'``).
Invalid tokens are weighted out rather than indexed out: no host synchronisation on a GPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from comoe.config import ComoeConfig
from comoe.moe.record import LayerRecord
from comoe.objectives.gram import one_hot
from comoe.objectives.infonce import check_topk, valid_mask, zero_with_grad
from comoe.objectives.registry import Objective, register_objective, stacked


def _upcast(x: Tensor) -> Tensor:
    """Half types in float32, so the loss is not limited by fp16/bf16 rounding."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def load_balance_loss(
    router_probs: Tensor, topk_indices: Tensor, mask: Tensor | None = None, fraction: Tensor | None = None
) -> Tensor:
    """Switch-Transformer auxiliary loss ``n * sum_i f_i * P_i`` (equals 1 under uniform routing).

    ``f_i`` is the fraction of the ``valid_tokens * k`` routing assignments that go to expert ``i`` (a
    count, so it carries no gradient); ``P_i`` is the mean router probability of expert ``i`` over valid
    tokens, through which the gradient flows.  Minimised when both are uniform. ``fraction`` replaces f
    (e.g. counted over the global batch of several processes).

    Shapes: ``router_probs`` [..., T, n], ``topk_indices`` [..., T, k], ``mask`` [..., T] bool, ``fraction``
    [..., n]; returns [...] (a scalar without leading dimensions: one value per stacked layer).
    Source: Fedus et al. 2021 (Switch Transformer), eq. 4; MoELoRA (arXiv 2402.12851) and MixLoRA
    use it. Tested against the plain definition in ``comoe.objectives.reference``.
    """
    if router_probs.dim() < 2:
        raise ValueError(f"router_probs must have shape (T, n), got {tuple(router_probs.shape)}")
    num_tokens, num_experts = router_probs.shape[-2:]
    k = check_topk(topk_indices, num_tokens, num_experts)
    # Invalid tokens are weighted out rather than indexed out: no host synchronisation on a GPU.
    probs = _upcast(router_probs)
    weights = valid_mask(mask, router_probs.shape[:-1], router_probs.device).to(probs.dtype)
    count = weights.sum(-1, keepdim=True)  # [..., 1]
    if k == 0:
        return zero_with_grad(probs)
    if fraction is None:
        topk = topk_indices.to(router_probs.device).clamp(0, num_experts - 1)  # padding may hold any index
        assigned = (one_hot(topk, num_experts, probs.dtype) * weights[..., None, None]).sum(dim=(-3, -2))
        fraction = assigned / (count * k).clamp_min(1)
    mean_prob = (probs * weights.unsqueeze(-1)).sum(dim=-2) / count.clamp_min(1)
    return num_experts * (fraction * mean_prob).sum(-1)


def global_expert_fraction(record: LayerRecord) -> Tensor | None:
    """f_i of the balance loss counted over every process's tokens (None with one process).

    Only the counts are shared: the gradient flows through each process's own mean probabilities, and the
    trainer's per-token weighting of the auxiliary loss then gives exactly the one-process gradient.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    routing = record.routing
    indices = routing.indices if record.mask is None else routing.indices[record.mask]
    counts = torch.bincount(indices.reshape(-1), minlength=routing.num_experts).double()
    dist.all_reduce(counts)
    return (counts / counts.sum().clamp_min(1)).to(routing.probs.dtype)


def mass_fraction(record: LayerRecord, across_processes: bool = False) -> Tensor:
    """f_i for dense (soft) routing: expert i's share of the router's probability mass over real tokens,
    detached as the Switch count is. Every expert is active there, so the counted f would be uniform and
    n * sum_i f_i P_i = 1 for any router; with f = P-bar the loss is n * sum_i P-bar_i^2 (1 when uniform,
    n when one expert takes all) and its gradient pushes mass off the heavy experts."""
    return _mass_fraction(record.routing.probs, record.mask, across_processes)


def _mass_fraction(probs: Tensor, mask: Tensor | None, across_processes: bool = False) -> Tensor:
    """mass_fraction from probs [..., T, n] and mask [..., T]: [..., n]."""
    probs = probs.detach()
    weights = torch.ones(probs.shape[:-1], device=probs.device) if mask is None else mask.to(probs)
    sums = torch.cat([(probs * weights.unsqueeze(-1)).sum(-2), weights.sum(-1, keepdim=True)], -1).double()
    if across_processes and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    return (sums[..., :-1] / sums[..., -1:].clamp_min(1)).to(probs.dtype)


def active_fraction(
    indices: Tensor, active: Tensor, mask: Tensor | None, num_experts: int, across_processes: bool = False
) -> Tensor:
    """f_i for routing kinds whose number of active experts varies per token (Routing.active, the k = n
    layout with zero gates for the inactive experts: AdaMoLE's threshold): expert i's share of the really
    active (token, expert) assignments over real tokens, the Switch count with the inactive slots left out.
    indices, active [..., T, k], mask [..., T] -> [..., n] (detached: a count)."""
    weights = valid_mask(mask, active.shape[:-1], active.device).to(torch.float32)
    slots = active.to(torch.float32) * weights.unsqueeze(-1)  # [..., T, k]
    counts = (one_hot(indices, num_experts, torch.float32) * slots.unsqueeze(-1)).sum(dim=(-3, -2))
    sums = torch.cat([counts, slots.sum(dim=(-2, -1)).unsqueeze(-1)], -1).double()
    if across_processes and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    return (sums[..., :-1] / sums[..., -1:].clamp_min(1)).float()


def balance_loss(record: LayerRecord, config: ComoeConfig) -> Tensor:
    """Switch load balancing of one layer, with expert load counted locally or over all processes; for
    dense routing (k = n) the load is the probability mass (mass_fraction), except for kinds that mark
    their really active experts (Routing.active), whose active assignments are counted (active_fraction)."""
    across = config.balance_scope == "global"
    routing = record.routing
    if routing.active is not None:
        fraction = active_fraction(routing.indices, routing.active, record.mask, routing.num_experts, across)
    elif record.routing.indices.shape[1] == record.routing.num_experts:
        fraction = mass_fraction(record, across)
    else:
        fraction = global_expert_fraction(record) if across else None
    return load_balance_loss(record.routing.probs, record.routing.indices, record.mask, fraction)


def balance_batched(records: list[LayerRecord], config: ComoeConfig) -> Tensor | None:
    """`balance_loss` of every record of one group at once, [L]; None (the per-layer path) when the load
    is counted over processes for top-k routing (each layer's counts are all-reduced on their own)."""
    dense = records[0].routing.indices.shape[1] == records[0].routing.num_experts
    across = config.balance_scope == "global"
    if across and not dense:
        return None
    probs = stacked(records, lambda record: record.routing.probs)
    mask = stacked(records, lambda record: record.mask)
    indices = stacked(records, lambda record: record.routing.indices)
    active = stacked(records, lambda record: record.routing.active)
    if active is not None:
        fraction = active_fraction(indices, active, mask, probs.shape[-1], across)
    else:
        fraction = _mass_fraction(probs, mask, across) if dense else None
    return load_balance_loss(probs, indices, mask, fraction)


BALANCE = register_objective(
    Objective(
        "balance",
        balance_loss,
        component="balance",
        batched_loss=balance_batched,
        description="Switch load balancing n * sum_i f_i P_i (weight: balance_weight)",
    )
)
