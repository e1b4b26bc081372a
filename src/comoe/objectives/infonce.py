"""The InfoNCE tails shared by the reference definitions and the fast paths of the contrastive objectives.

Given cosines between expert outputs (however they were computed: from materialised outputs in
``comoe.objectives.reference``, from Gram matrices in ``comoe.objectives.gram``), these apply the
anchors, positives and negatives, the random draws and the reduction over tokens, so the fast path and
the reference differ in the cosines only. Also the token-mask and top-k checks every objective shares.

Conventions: ``T`` tokens, ``n`` experts, ``k`` activated per token; ``mask[t]`` True for real tokens
(``None``: all); with nothing to count the result is a zero that keeps a ``grad_fn``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "activation_mask",
    "check_topk",
    "comoe_loss_from_anchor_cosines",
    "sample_contrastive_tokens",
    "supcon_loss",
    "valid_mask",
    "zero_with_grad",
]


def valid_mask(mask: Tensor | None, num_tokens: int, device: torch.device) -> Tensor:
    """`[T]` bool: the token mask checked against T (ValueError naming both shapes), or all True."""
    if mask is None:
        return torch.ones(num_tokens, dtype=torch.bool, device=device)
    if mask.shape != (num_tokens,):
        raise ValueError(f"mask must have shape ({num_tokens},), got {tuple(mask.shape)}")
    return mask.to(device=device, dtype=torch.bool)


def check_topk(topk_indices: Tensor, num_tokens: int, num_experts: int) -> int:
    """k of a `[T, k]` top-k index tensor; ValueError for a wrong shape or k > n."""
    if topk_indices.dim() != 2 or topk_indices.shape[0] != num_tokens:
        raise ValueError(f"topk_indices must have shape ({num_tokens}, k), got {tuple(topk_indices.shape)}")
    k = topk_indices.shape[1]
    if k > num_experts:
        raise ValueError(f"k={k} activated experts exceeds the number of experts n={num_experts}")
    return k


def activation_mask(topk_indices: Tensor, num_experts: int, check: bool = True) -> Tensor:
    """``[T, n]`` bool, True where the expert is in the token's top-k; rejects out-of-range/duplicates
    (``check``, which synchronises with the device)."""
    if check and topk_indices.numel() and (topk_indices.min() < 0 or topk_indices.max() >= num_experts):
        raise ValueError(f"topk_indices must lie in [0, {num_experts})")
    active = torch.zeros(topk_indices.shape[0], num_experts, dtype=torch.bool, device=topk_indices.device)
    active.scatter_(1, topk_indices, True)
    if check and (active.sum(dim=1) != topk_indices.shape[1]).any():
        raise ValueError("topk_indices must not repeat an expert within a token")
    return active


def zero_with_grad(x: Tensor) -> Tensor:
    """A zero that keeps a grad_fn connected to `x`, so `loss.backward()` works when nothing counts."""
    return x.sum() * 0


def comoe_loss_from_anchor_cosines(
    anchor_cosines: Tensor,
    topk_indices: Tensor,
    temperature: float,
    anchor: str = "all",
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    num_negatives: int | None = None,
    check: bool = True,
) -> Tensor:
    """``comoe_loss`` given ``anchor_cosines[t, s, j]``: the cosine between the output of the expert in
    top-k slot ``s`` of token ``t`` and expert ``j``'s output, ``[T, k, n]``.

    Shared by the reference (cosines of materialised outputs) and the layer's fast path (only these k rows,
    from the experts' Gram matrices), so both apply the same InfoNCE, draws and reduction. ``check=False``
    skips validating the indices (which reads them on the host): for indices that come from ``topk``.
    """
    num_tokens, _, num_experts = anchor_cosines.shape
    k = check_topk(topk_indices, num_tokens, num_experts)
    if k < 2:
        raise ValueError(f"comoe_loss needs k >= 2 activated experts per token (for positives), got k={k}")
    if anchor not in ("all", "random"):
        raise ValueError(f"anchor must be 'all' or 'random', got {anchor!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if num_negatives is not None and num_negatives < 0:
        raise ValueError(f"num_negatives must be >= 0 or None, got {num_negatives}")

    device = anchor_cosines.device
    draw_device = generator.device if generator is not None else device
    num_inactive = num_experts - k
    anchor_slots = None
    if anchor == "random":
        anchor_slots = torch.randint(k, (num_tokens,), generator=generator, device=draw_device).to(device)
    negative_keys = None
    if num_negatives is not None and num_negatives < num_inactive:
        negative_keys = torch.rand((num_tokens, num_inactive), generator=generator, device=draw_device)
        negative_keys = negative_keys.to(device)

    # Every token is computed and the invalid ones are weighted out at the end: no boolean indexing, so
    # no host synchronisation (a GPU stall per layer per step otherwise). Invalid rows may hold any index
    # (padding); they are replaced by a well-formed row before use.
    valid = valid_mask(mask, num_tokens, device)
    topk = topk_indices.to(device)
    if check:
        activation_mask(topk[valid], num_experts)  # range and distinctness of the tokens that count
    topk = torch.where(valid.unsqueeze(1), topk, torch.arange(k, device=device))
    active = activation_mask(topk, num_experts, check=False)  # [T, n]

    negatives = ~active
    if negative_keys is not None:
        # Non-activated expert ids in ascending order, then keep the sampled positions among them.
        inactive_ids = torch.argsort(active.to(torch.int8), dim=1, stable=True)[:, :num_inactive]
        chosen_pos = negative_keys.argsort(dim=1)[:, :num_negatives]
        chosen_ids = inactive_ids.gather(1, chosen_pos)
        negatives = torch.zeros_like(active).scatter_(1, chosen_ids, True)

    anchors, anchor_sim = topk, anchor_cosines / temperature  # [T, A], [T, A, n]
    if anchor_slots is not None:
        slots = anchor_slots.unsqueeze(1)
        anchors = topk.gather(1, slots)
        anchor_sim = anchor_sim.gather(1, slots.unsqueeze(-1).expand(-1, -1, num_experts))
    expert_ids = torch.arange(num_experts, device=device)
    positive = active.unsqueeze(1) & (expert_ids != anchors.unsqueeze(-1))  # [T, A, n]
    candidate = positive | negatives.unsqueeze(1)
    log_num = anchor_sim.masked_fill(~positive, float("-inf")).logsumexp(dim=-1)
    log_den = anchor_sim.masked_fill(~candidate, float("-inf")).logsumexp(dim=-1)
    per_token = (log_den - log_num).mean(dim=1)  # [T]
    return torch.where(valid, per_token, 0).sum() / valid.sum().clamp_min(1)


def sample_contrastive_tokens(
    topk_indices: Tensor, mask: Tensor | None, max_tokens: int | None, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """The valid tokens entering ``moelora_loss`` (at most ``max_tokens``, sampled) and their top-k rows."""
    device = topk_indices.device
    valid_tokens = valid_mask(mask, topk_indices.shape[0], device).nonzero().squeeze(1)
    if max_tokens is not None and valid_tokens.numel() > max_tokens:
        draw_device = generator.device if generator is not None else device
        keep = torch.randperm(valid_tokens.numel(), generator=generator, device=draw_device)[:max_tokens]
        valid_tokens = valid_tokens[keep.to(device)]
    return valid_tokens, topk_indices[valid_tokens]


def supcon_loss(cosines: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Supervised-contrastive InfoNCE over N items given their cosine matrix ``[N, N]`` and labels ``[N]``.

    Shared by the reference and the layer's fast path (which gets the cosines from Gram matrices).
    """
    sim = cosines / temperature
    is_self = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    positive = (labels.unsqueeze(0) == labels.unsqueeze(1)) & ~is_self
    num_pos = positive.sum(dim=1)
    has_pos = num_pos > 0
    if not has_pos.any():
        return zero_with_grad(cosines)
    log_prob = sim - sim.masked_fill(is_self, float("-inf")).logsumexp(dim=1, keepdim=True)
    pos_sum = torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    per_item = -pos_sum[has_pos] / num_pos[has_pos]
    return per_item.mean()

