"""The InfoNCE tails shared by the reference definitions and the fast paths of the contrastive objectives.

Given cosines between expert outputs (however they were computed: from materialised outputs in
``comoe.objectives.reference``, from Gram matrices in ``comoe.objectives.gram``), these apply the
anchors, positives and negatives, the random draws and the reduction over tokens, so the fast path and
the reference differ in the cosines only. Also the token-mask and top-k checks every objective shares.

Conventions: ``T`` tokens, ``n`` experts, ``k`` activated per token; ``mask[t]`` True for real tokens
(``None``: all); with nothing to count the result is a zero that keeps a ``grad_fn``. Every function takes
optional leading dimensions ``[...]`` (the adapted layers of one shape, stacked: comoe.objectives.auxiliary
computes an objective once per group of layers) and returns one value per leading index.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "activation_mask",
    "check_topk",
    "comoe_loss_from_anchor_cosines",
    "contrastive_items",
    "draw_anchors_and_negatives",
    "sample_contrastive_tokens",
    "sampled_negatives",
    "supcon_loss",
    "valid_mask",
    "zero_with_grad",
]


def valid_mask(mask: Tensor | None, tokens: int | tuple[int, ...], device: torch.device) -> Tensor:
    """`[..., T]` bool: the token mask checked against the shape `tokens` (T, or the leading dimensions and
    T; ValueError naming both shapes), or all True."""
    shape = (tokens,) if isinstance(tokens, int) else tuple(tokens)
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask must have shape {shape}, got {tuple(mask.shape)}")
    return mask.to(device=device, dtype=torch.bool)


def check_topk(topk_indices: Tensor, num_tokens: int, num_experts: int) -> int:
    """k of a `[..., T, k]` top-k index tensor; ValueError for a wrong shape or k > n."""
    if topk_indices.dim() < 2 or topk_indices.shape[-2] != num_tokens:
        raise ValueError(f"topk_indices must have shape ({num_tokens}, k), got {tuple(topk_indices.shape)}")
    k = topk_indices.shape[-1]
    if k > num_experts:
        raise ValueError(f"k={k} activated experts exceeds the number of experts n={num_experts}")
    return k


def activation_mask(topk_indices: Tensor, num_experts: int, check: bool = True) -> Tensor:
    """``[..., T, n]`` bool, True where the expert is in the token's top-k; rejects out-of-range/duplicates
    (``check``, which synchronises with the device)."""
    if check and topk_indices.numel() and (topk_indices.min() < 0 or topk_indices.max() >= num_experts):
        raise ValueError(f"topk_indices must lie in [0, {num_experts})")
    shape = (*topk_indices.shape[:-1], num_experts)
    active = torch.zeros(shape, dtype=torch.bool, device=topk_indices.device)
    active.scatter_(-1, topk_indices, True)
    if check and (active.sum(dim=-1) != topk_indices.shape[-1]).any():
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
    top-k slot ``s`` of token ``t`` and expert ``j``'s output, ``[..., T, k, n]`` (``topk_indices``
    ``[..., T, k]``, ``mask`` ``[..., T]``); returns ``[...]``, the mean over each leading index's real
    tokens.

    Shared by the reference (cosines of materialised outputs) and the layer's fast path (only these k rows,
    from the experts' Gram matrices), so both apply the same InfoNCE, draws and reduction. ``check=False``
    skips validating the indices (which reads them on the host): for indices that come from ``topk``.
    """
    num_tokens, _, num_experts = anchor_cosines.shape[-3:]
    lead = tuple(anchor_cosines.shape[:-3])
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
    anchor_slots, negative_keys = draw_anchors_and_negatives(
        (*lead, num_tokens), num_experts, k, anchor, num_negatives, generator, device
    )

    # Every token is computed and the invalid ones are weighted out at the end: no boolean indexing, so
    # no host synchronisation (a GPU stall per layer per step otherwise). Invalid rows may hold any index
    # (padding); they are replaced by a well-formed row before use.
    valid = valid_mask(mask, (*lead, num_tokens), device)
    topk = topk_indices.to(device)
    if check:
        activation_mask(topk[valid], num_experts)  # range and distinctness of the tokens that count
    topk = torch.where(valid.unsqueeze(-1), topk, torch.arange(k, device=device))
    active = activation_mask(topk, num_experts, check=False)  # [T, n]
    negatives = sampled_negatives(active, negative_keys, num_negatives)

    anchors, anchor_sim = topk, anchor_cosines / temperature  # [..., T, A], [..., T, A, n]
    if anchor_slots is not None:
        slots = anchor_slots.unsqueeze(-1)
        anchors = topk.gather(-1, slots)
        anchor_sim = anchor_sim.gather(-2, slots.unsqueeze(-1).expand(*slots.shape, num_experts))
    expert_ids = torch.arange(num_experts, device=device)
    positive = active.unsqueeze(-2) & (expert_ids != anchors.unsqueeze(-1))  # [..., T, A, n]
    candidate = positive | negatives.unsqueeze(-2)
    log_num = anchor_sim.masked_fill(~positive, float("-inf")).logsumexp(dim=-1)
    log_den = anchor_sim.masked_fill(~candidate, float("-inf")).logsumexp(dim=-1)
    per_token = (log_den - log_num).mean(dim=-1)  # [..., T]
    return torch.where(valid, per_token, 0).sum(-1) / valid.sum(-1).clamp_min(1)


def draw_anchors_and_negatives(
    tokens: tuple[int, ...],
    num_experts: int,
    k: int,
    anchor: str,
    num_negatives: int | None,
    generator: torch.Generator | None,
    device: torch.device,
) -> tuple[Tensor | None, Tensor | None]:
    """CoMoE's random draws for `tokens` = (..., T), in `comoe_loss`'s documented order (on
    ``generator.device``, else on `device`; returned on `device`): each token's anchor slot [..., T] in
    [0, k) for ``anchor="random"`` (else None), then random keys [..., T, n - k] that sample
    ``num_negatives`` of the inactive experts when that is fewer than all of them (else None)."""
    draw_device = generator.device if generator is not None else device
    num_inactive = num_experts - k
    anchor_slots = None
    if anchor == "random":
        anchor_slots = torch.randint(k, tokens, generator=generator, device=draw_device).to(device)
    negative_keys = None
    if num_negatives is not None and num_negatives < num_inactive:
        negative_keys = torch.rand((*tokens, num_inactive), generator=generator, device=draw_device)
        negative_keys = negative_keys.to(device)
    return anchor_slots, negative_keys


def sampled_negatives(active: Tensor, negative_keys: Tensor | None, num_negatives: int | None) -> Tensor:
    """[..., T, n] bool: each token's negatives, every inactive expert (`negative_keys` None) or the
    `num_negatives` whose keys are smallest among the inactive ones listed in ascending expert id
    (`draw_anchors_and_negatives`), given the active experts `active` [..., T, n]."""
    if negative_keys is None:
        return ~active
    num_inactive = negative_keys.shape[-1]
    inactive_ids = torch.argsort(active.to(torch.int8), dim=-1, stable=True)[..., :num_inactive]
    chosen_ids = inactive_ids.gather(-1, negative_keys.argsort(dim=-1)[..., :num_negatives])
    return torch.zeros_like(active).scatter_(-1, chosen_ids, True)


def sample_contrastive_tokens(
    topk_indices: Tensor, mask: Tensor | None, max_tokens: int | None, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """The tokens entering ``moelora_loss``, a fixed number m = min(max_tokens, T) of them ``[..., m]``,
    and whether each is a real token ``[..., m]``. With at most m real tokens every one of them is taken
    (the rest are padding, weighted out); with more, m real ones drawn uniformly without replacement (a
    random key per token, real tokens' keys below padding's, the m smallest). The size never depends on
    the data, so nothing is read back to the host (no GPU sync). ``topk_indices`` ``[..., T, k]``."""
    num_tokens = topk_indices.shape[-2]
    lead = tuple(topk_indices.shape[:-2])
    device = topk_indices.device
    valid = valid_mask(mask, (*lead, num_tokens), device)
    if max_tokens is None or max_tokens >= num_tokens:
        return torch.arange(num_tokens, device=device).expand(*lead, num_tokens), valid
    draw_device = generator.device if generator is not None else device
    keys = torch.rand((*lead, num_tokens), generator=generator, device=draw_device).to(device)
    keys = keys - valid.to(keys.dtype)  # real tokens in [-1, 0), padding in [0, 1)
    tokens = keys.topk(max_tokens, dim=-1, largest=False).indices
    return tokens, valid.gather(-1, tokens)


def contrastive_items(
    topk_indices: Tensor, tokens: Tensor, token_valid: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The (token, expert) items of ``moelora_loss`` for the sampled ``tokens`` ``[..., m]``: each token's k
    activated experts, ``[..., m*k]`` each of item token, item expert (its label) and whether it counts."""
    k = topk_indices.shape[-1]
    topk = topk_indices.gather(-2, tokens.unsqueeze(-1).expand(*tokens.shape, k))

    def per_item(values: Tensor) -> Tensor:
        return values.unsqueeze(-1).expand(*values.shape, k).flatten(-2)

    return per_item(tokens), topk.flatten(-2), per_item(token_valid)


def supcon_loss(cosines: Tensor, labels: Tensor, temperature: float, valid: Tensor | None = None) -> Tensor:
    """Supervised-contrastive InfoNCE (Khosla et al. 2020, eq. 2, L_out) over N items given their cosine
    matrix ``[..., N, N]`` and labels ``[..., N]``: the mean over counted items with a positive of
    -mean over positives p of log(exp(s_ip) / sum_{a != i} exp(s_ia)), s = cosine / temperature.

    ``valid`` ``[..., N]`` bool (None: all): items that are not valid (padding) neither count nor appear
    as positives or in any denominator. Returns ``[...]``; with nothing to count a zero with a grad_fn.
    Shared by the reference and the layer's fast path (which gets the cosines from Gram matrices).
    """
    sim = cosines / temperature
    size = sim.shape[-1]
    allowed = ~torch.eye(size, dtype=torch.bool, device=sim.device)
    if valid is not None:
        allowed = allowed & valid.unsqueeze(-2)
    positive = (labels.unsqueeze(-1) == labels.unsqueeze(-2)) & allowed
    num_pos = positive.sum(dim=-1)
    counted = num_pos > 0 if valid is None else (num_pos > 0) & valid
    # A finite fill: a row with no allowed column (no real item but itself) keeps a finite gradient.
    log_den = sim.masked_fill(~allowed, torch.finfo(sim.dtype).min).logsumexp(dim=-1, keepdim=True)
    pos_sum = torch.where(positive, sim - log_den, 0).sum(dim=-1)
    weights = counted.to(sim.dtype)
    return -(pos_sum / num_pos.clamp_min(1) * weights).sum(-1) / weights.sum(-1).clamp_min(1)
