"""Reference definitions of the auxiliary losses used by comoe.

These are the plain, obviously-correct versions, the oracle of the tests: the library's fast paths
(comoe.objectives.balance, comoe.objectives.contrastive, comoe.objectives.router_z) are tested against
them and never import this module, so they favour clarity over speed. The InfoNCE tails
(comoe.objectives.infonce) and the normalisation (comoe.objectives.cosine) are shared: the reference
computes the cosines from materialised outputs, the fast path from Gram matrices.  Conventions shared by
all functions:

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
from torch import Tensor

from comoe.objectives.cosine import NORMALIZE_EPS, normalize_with_floor
from comoe.objectives.infonce import (
    activation_mask,
    check_topk,
    comoe_loss_from_anchor_cosines,
    sample_contrastive_tokens,
    supcon_loss,
    valid_mask,
    zero_with_grad,
)

__all__ = [
    "NORMALIZE_EPS",
    "comoe_loss",
    "cosine_similarity_matrix",
    "load_balance_loss",
    "localized_balance_loss",
    "comoe_loss_from_anchor_cosines",
    "moelora_loss",
    "normalize_with_floor",
    "router_z_loss",
    "sample_contrastive_tokens",
    "supcon_loss",
]

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


def _compute_dtype(x: Tensor) -> Tensor:
    """Upcast half types so the reference is not limited by fp16/bf16 rounding."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def load_balance_loss(
    router_probs: Tensor, topk_indices: Tensor, mask: Tensor | None = None, fraction: Tensor | None = None
) -> Tensor:
    """Switch-Transformer auxiliary loss ``n * sum_i f_i * P_i`` (equals 1 under uniform routing), plainly:
    the real tokens are selected, ``f_i`` is expert ``i``'s share of their ``k`` assignments each (a count,
    no gradient), ``P_i`` its mean router probability over them (the gradient flows there).
    ``fraction`` replaces f (e.g. counted over several processes). Fedus et al. 2021, eq. 4.
    """
    if router_probs.dim() != 2:
        raise ValueError(f"router_probs must have shape (T, n), got {tuple(router_probs.shape)}")
    num_tokens, num_experts = router_probs.shape
    k = check_topk(topk_indices, num_tokens, num_experts)
    keep = valid_mask(mask, num_tokens, router_probs.device)
    probs = _compute_dtype(router_probs)[keep]
    if k == 0 or probs.shape[0] == 0:
        return zero_with_grad(_compute_dtype(router_probs))
    if fraction is None:
        counts = torch.bincount(topk_indices[keep].reshape(-1), minlength=num_experts)
        fraction = counts.to(probs.dtype) / (probs.shape[0] * k)
    return num_experts * (fraction * probs.mean(dim=0)).sum()


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
    check_topk(topk_indices, num_tokens, num_experts)
    floor = None if norm_floor is None else norm_floor.unsqueeze(-1)  # [T, 1]: one floor per token
    cosines = cosine_similarity_matrix(_compute_dtype(expert_outputs), floor=floor)  # [T, n, n]
    rows = topk_indices.to(cosines.device).clamp(0, num_experts - 1)  # padding rows may hold any index
    anchor_cosines = cosines.gather(1, rows.unsqueeze(-1).expand(-1, -1, num_experts))  # [T, k, n]
    return comoe_loss_from_anchor_cosines(
        anchor_cosines, topk_indices, temperature, anchor, mask, generator, num_negatives
    )


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

    ``max_tokens=m``: if ``m < T``, keep the valid tokens among the m of smallest key ``u_t - valid_t``,
    ``u = torch.rand(T, generator=generator)`` (drawn on ``generator.device``, else on
    ``expert_outputs.device``): every valid token when at most m are valid, else m of them uniformly
    (``sample_contrastive_tokens``); nothing is drawn otherwise.  This bounds the quadratic item matrix.
    ``norm_floor`` (``[T]``): per-token floor of the output norms, as in ``comoe_loss``.
    """
    if expert_outputs.dim() != 3:
        raise ValueError(f"expert_outputs must have shape (T, n, d), got {tuple(expert_outputs.shape)}")
    num_tokens, num_experts, _ = expert_outputs.shape
    check_topk(topk_indices, num_tokens, num_experts)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")

    sampled, sampled_valid = sample_contrastive_tokens(topk_indices, mask, max_tokens, generator)
    tokens = sampled[sampled_valid]
    topk = topk_indices[tokens]
    outputs = _compute_dtype(expert_outputs)[tokens]  # [M, n, d]
    activation_mask(topk, num_experts)  # validates range and distinctness
    items = outputs.gather(1, topk.unsqueeze(-1).expand(-1, -1, outputs.shape[-1])).flatten(0, 1)  # [N, d]
    if items.shape[0] == 0:
        return zero_with_grad(expert_outputs)
    floor = None if norm_floor is None else norm_floor[tokens].repeat_interleave(topk.shape[1])  # [N]
    return supcon_loss(cosine_similarity_matrix(items, floor=floor), topk.flatten(), temperature)


def router_z_loss(router_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """ST-MoE's router z-loss (Zoph et al. 2022, arXiv 2202.08906, eq. 5), plainly: for each real token its
    logits' log-sum-exp, log(sum_i exp(x_i)) (shifted by the largest logit so that exp cannot overflow),
    squared; the mean over real tokens. ``router_logits`` [T, n], ``mask`` [T] bool; a scalar."""
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must have shape (T, n), got {tuple(router_logits.shape)}")
    keep = valid_mask(mask, router_logits.shape[0], router_logits.device)
    logits = _compute_dtype(router_logits)
    terms = []
    for token in range(logits.shape[0]):
        if keep[token]:
            row = logits[token]
            top = row.max()
            terms.append((torch.log(torch.exp(row - top).sum()) + top) ** 2)
    if not terms:
        return zero_with_grad(logits)
    return torch.stack(terms).mean()


def localized_balance_loss(
    router_probs: Tensor, knowledge: Tensor, mask: Tensor | None = None, delta: float = 0.1
) -> Tensor:
    """LoRAMoE's localized balancing constraint (arXiv 2312.09979, section 3.2), plainly: for each example
    b (``knowledge`` [B] bool, its rows of ``router_probs`` [B * S, n] in order) and expert i, the sum of
    the expert's gates over the example's real tokens, times 1 + delta when the expert's group (world
    knowledge for i >= n // 2, downstream tasks below) is the example's type and 1 - delta otherwise; the
    loss is the unbiased variance of those B * n numbers over their squared mean (+ 1e-10).
    """
    num_tokens, num_experts = router_probs.shape
    probs = _compute_dtype(router_probs)
    keep = valid_mask(mask, num_tokens, router_probs.device)
    length = num_tokens // knowledge.shape[0]
    values = []
    for b in range(knowledge.shape[0]):
        rows = range(b * length, (b + 1) * length)
        for i in range(num_experts):
            importance = sum((probs[t, i] for t in rows if keep[t]), probs.new_zeros(()))
            own_group = bool(knowledge[b]) == (i >= num_experts // 2)
            values.append(importance * (1.0 + delta if own_group else 1.0 - delta))
    z = torch.stack(values)
    if z.numel() < 2:
        return z.sum() * 0.0
    mean = z.mean()
    variance = ((z - mean) ** 2).sum() / (z.numel() - 1)
    return variance / (mean**2 + 1e-10)
