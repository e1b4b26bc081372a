"""Reference definitions of the auxiliary losses used by comoe.

These are the plain, obviously-correct versions: the library's fast paths are tested against them, so
they favour clarity over speed.  Conventions shared by all functions:

* ``T`` tokens, ``n`` experts, ``k`` experts activated per token, ``d`` output features.
* ``mask[t]`` is True for valid (non-padding) tokens; ``None`` means every token is valid.  Masked-out
  tokens are dropped before anything is computed, so their ``topk_indices`` may hold any value.
* Cosine similarities use ``F.normalize(eps=NORMALIZE_EPS)``, i.e. ``x / max(||x||, 1e-8)``: an all-zero
  expert output normalises to zero and has cosine 0 with everything.
* Half-precision inputs (fp16/bf16) are upcast to fp32; the result has the compute dtype.
* When nothing contributes (no valid tokens / no items with positives) the result is a zero that keeps a
  ``grad_fn`` connected to the input, so ``loss.backward()`` still works in a training loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "NORMALIZE_EPS",
    "comoe_loss",
    "cosine_similarity_matrix",
    "load_balance_loss",
    "comoe_loss_from_anchor_cosines",
    "moelora_loss",
    "normalize_with_floor",
    "sample_contrastive_tokens",
    "supcon_loss",
]

NORMALIZE_EPS = 1e-8
"""Denominator floor for L2 normalisation (``F.normalize`` eps) in every cosine similarity here."""


def cosine_similarity_matrix(
    x: Tensor, y: Tensor | None = None, eps: float = NORMALIZE_EPS, floor: Tensor | None = None
) -> Tensor:
    """Pairwise cosine similarities ``[..., M, N]`` between rows of ``x [..., M, d]`` and ``y [..., N, d]``.

    ``y=None`` means ``y = x``.  Rows are normalised with ``F.normalize(eps=eps)`` so zero rows give 0
    rather than NaN.  ``floor`` (``[...]``, one value per leading index, e.g. per token) raises the
    denominator to ``max(||x||, floor)`` (broadcastable to ``x.shape[:-1]``): see ``normalize_with_floor``.
    """
    xn = normalize_with_floor(x, eps, floor)
    yn = xn if y is None else normalize_with_floor(y, eps, floor)
    return xn @ yn.transpose(-1, -2)


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


def _compute_dtype(x: Tensor) -> Tensor:
    """Upcast half types so the reference is not limited by fp16/bf16 rounding."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _valid_mask(mask: Tensor | None, num_tokens: int, device: torch.device) -> Tensor:
    if mask is None:
        return torch.ones(num_tokens, dtype=torch.bool, device=device)
    if mask.shape != (num_tokens,):
        raise ValueError(f"mask must have shape ({num_tokens},), got {tuple(mask.shape)}")
    return mask.to(device=device, dtype=torch.bool)


def _check_topk(topk_indices: Tensor, num_tokens: int, num_experts: int) -> int:
    if topk_indices.dim() != 2 or topk_indices.shape[0] != num_tokens:
        raise ValueError(f"topk_indices must have shape ({num_tokens}, k), got {tuple(topk_indices.shape)}")
    k = topk_indices.shape[1]
    if k > num_experts:
        raise ValueError(f"k={k} activated experts exceeds the number of experts n={num_experts}")
    return k


def _activation_mask(topk_indices: Tensor, num_experts: int, check: bool = True) -> Tensor:
    """``[T, n]`` bool, True where the expert is in the token's top-k; rejects out-of-range/duplicates
    (``check``, which synchronises with the device)."""
    if check and topk_indices.numel() and (topk_indices.min() < 0 or topk_indices.max() >= num_experts):
        raise ValueError(f"topk_indices must lie in [0, {num_experts})")
    active = torch.zeros(topk_indices.shape[0], num_experts, dtype=torch.bool, device=topk_indices.device)
    active.scatter_(1, topk_indices, True)
    if check and (active.sum(dim=1) != topk_indices.shape[1]).any():
        raise ValueError("topk_indices must not repeat an expert within a token")
    return active


def _zero_with_grad(x: Tensor) -> Tensor:
    return x.sum() * 0


def load_balance_loss(
    router_probs: Tensor, topk_indices: Tensor, mask: Tensor | None = None, fraction: Tensor | None = None
) -> Tensor:
    """Switch-Transformer auxiliary loss ``n * sum_i f_i * P_i`` (equals 1 under uniform routing).

    ``f_i`` is the fraction of the ``valid_tokens * k`` routing assignments that go to expert ``i`` (a
    count, so it carries no gradient); ``P_i`` is the mean router probability of expert ``i`` over valid
    tokens, through which the gradient flows.  Minimised when both are uniform. ``fraction`` replaces f
    (e.g. counted over the global batch of several processes).
    """
    if router_probs.dim() != 2:
        raise ValueError(f"router_probs must have shape (T, n), got {tuple(router_probs.shape)}")
    num_tokens, num_experts = router_probs.shape
    k = _check_topk(topk_indices, num_tokens, num_experts)
    # Invalid tokens are weighted out rather than indexed out: no host synchronisation on a GPU.
    probs = _compute_dtype(router_probs)
    weights = _valid_mask(mask, num_tokens, router_probs.device).to(probs.dtype)
    count = weights.sum()
    if k == 0:
        return _zero_with_grad(probs)
    if fraction is None:
        topk = topk_indices.to(router_probs.device).clamp(0, num_experts - 1)  # padding may hold any index
        assigned = (F.one_hot(topk, num_experts).to(probs.dtype) * weights[:, None, None]).sum(dim=(0, 1))
        fraction = assigned / (count * k).clamp_min(1)
    mean_prob = (probs * weights.unsqueeze(1)).sum(dim=0) / count.clamp_min(1)
    return num_experts * (fraction * mean_prob).sum()


def comoe_loss(
    expert_outputs: Tensor,
    topk_indices: Tensor,
    temperature: float,
    anchor: str = "all",
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    num_negatives: int | None = None,
    norm_floor: Tensor | None = None,
) -> Tensor:
    """CoMoE contrastive loss (arXiv 2505.17553, Algorithm 1): pull activated experts together, push the
    non-activated ones away, so experts specialise.

    Per token, with ``T_set`` its top-k experts and ``N_set`` the other ``n - k``: an anchor ``a`` in
    ``T_set`` has positives ``P = T_set \\ {a}`` and negatives ``N_set``.  With ``s_j = cos(e_a, e_j) / tau``,
    ``loss_a = -log(sum_P e^s / sum_{P u N} e^s)``, computed as ``lse_{P u N}(s) - lse_P(s)``.
    ``anchor="all"`` averages over the k anchors; ``"random"`` uses one uniformly chosen anchor per token.
    The result is the mean over valid tokens.  ``n == k`` means no negatives, so every term is ``log 1 = 0``.

    Random draws (``generator``, on ``generator.device``, else on ``expert_outputs.device``), in this
    order and over all ``T`` tokens, masked ones included:

    1. ``anchor="random"``: ``slots = torch.randint(k, (T,))``; the anchor is ``topk_indices[t, slots[t]]``.
    2. ``num_negatives=m`` with ``m < n - k``: ``keys = torch.rand((T, n - k))``; token ``t`` keeps the
       non-activated experts (listed in ascending expert id) at positions ``keys[t].argsort()[:m]`` -- a
       uniform sample without replacement.  ``m >= n - k`` keeps all negatives and draws nothing.

    ``norm_floor`` (``[T]``): per-token floor of the output norms in the cosines (``normalize_with_floor``);
    ``None`` is the paper's plain cosine.
    """
    if expert_outputs.dim() != 3:
        raise ValueError(f"expert_outputs must have shape (T, n, d), got {tuple(expert_outputs.shape)}")
    num_tokens, num_experts, _ = expert_outputs.shape
    _check_topk(topk_indices, num_tokens, num_experts)
    floor = None if norm_floor is None else norm_floor.unsqueeze(-1)  # [T, 1]: one floor per token
    cosines = cosine_similarity_matrix(_compute_dtype(expert_outputs), floor=floor)  # [T, n, n]
    rows = topk_indices.to(cosines.device).clamp(0, num_experts - 1)  # padding rows may hold any index
    anchor_cosines = cosines.gather(1, rows.unsqueeze(-1).expand(-1, -1, num_experts))  # [T, k, n]
    return comoe_loss_from_anchor_cosines(
        anchor_cosines, topk_indices, temperature, anchor, mask, generator, num_negatives
    )


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
    k = _check_topk(topk_indices, num_tokens, num_experts)
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
    valid = _valid_mask(mask, num_tokens, device)
    topk = topk_indices.to(device)
    if check:
        _activation_mask(topk[valid], num_experts)  # range and distinctness of the tokens that count
    topk = torch.where(valid.unsqueeze(1), topk, torch.arange(k, device=device))
    active = _activation_mask(topk, num_experts, check=False)  # [T, n]

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


def moelora_loss(
    expert_outputs: Tensor,
    topk_indices: Tensor,
    temperature: float,
    mask: Tensor | None = None,
    max_tokens: int | None = None,
    generator: torch.Generator | None = None,
    norm_floor: Tensor | None = None,
) -> Tensor:
    """Supervised-contrastive (SupCon, Khosla et al. 2020) loss over activated (token, expert) outputs with
    the expert id as label -- our reading of MoELoRA (arXiv 2402.12851): one expert's outputs on different
    tokens should cluster, and different experts' outputs should separate.

    Items are ``normalize(e_i(t))`` for each valid token ``t`` and each ``i`` in its top-k.  For item ``u``
    with positives ``P(u)`` (same expert, other tokens) and ``s = cos / tau``:
    ``loss_u = -(1/|P(u)|) sum_{p in P(u)} [s_up - logsumexp_{a != u} s_ua]``.  Items without positives are
    left out; the result is the mean over the rest (a grad-connected zero if there are none).

    ``max_tokens=m``: if more than ``m`` tokens are valid, keep the valid tokens (listed in ascending
    position) at ``torch.randperm(num_valid, generator=generator)[:m]`` (drawn on ``generator.device``,
    else on ``expert_outputs.device``); nothing is drawn otherwise.  This bounds the quadratic item matrix.
    ``norm_floor`` (``[T]``): per-token floor of the output norms, as in ``comoe_loss``.
    """
    if expert_outputs.dim() != 3:
        raise ValueError(f"expert_outputs must have shape (T, n, d), got {tuple(expert_outputs.shape)}")
    num_tokens, num_experts, _ = expert_outputs.shape
    _check_topk(topk_indices, num_tokens, num_experts)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")

    tokens, topk = sample_contrastive_tokens(topk_indices, mask, max_tokens, generator)
    outputs = _compute_dtype(expert_outputs)[tokens]  # [M, n, d]
    _activation_mask(topk, num_experts)  # validates range and distinctness
    items = outputs.gather(1, topk.unsqueeze(-1).expand(-1, -1, outputs.shape[-1])).flatten(0, 1)  # [N, d]
    if items.shape[0] == 0:
        return _zero_with_grad(expert_outputs)
    floor = None if norm_floor is None else norm_floor[tokens].repeat_interleave(topk.shape[1])  # [N]
    return supcon_loss(cosine_similarity_matrix(items, floor=floor), topk.flatten(), temperature)


def sample_contrastive_tokens(
    topk_indices: Tensor, mask: Tensor | None, max_tokens: int | None, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """The valid tokens entering ``moelora_loss`` (at most ``max_tokens``, sampled) and their top-k rows."""
    device = topk_indices.device
    valid_tokens = _valid_mask(mask, topk_indices.shape[0], device).nonzero().squeeze(1)
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
        return _zero_with_grad(cosines)
    log_prob = sim - sim.masked_fill(is_self, float("-inf")).logsumexp(dim=1, keepdim=True)
    pos_sum = torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    per_item = -pos_sum[has_pos] / num_pos[has_pos]
    return per_item.mean()
