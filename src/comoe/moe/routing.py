"""Routing: which experts see a token and with what weight, and the expert-sorted layout of that choice.

Routing is reduced to plain tensors once per layer call (probabilities, top-k indices, renormalised
gates); every later step (expert compute, balance and contrastive losses, analysis) reads those.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Routing:
    """The routing decision for T tokens over n experts, k of which are active per token."""

    probs: torch.Tensor  # [T, n] float32 router softmax, differentiable
    indices: torch.Tensor  # [T, k] int64 active experts per token
    gates: torch.Tensor  # [T, k] weights of the active experts (sum to 1 per token), differentiable

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    def dense_gates(self) -> torch.Tensor:
        """[T, n] gate per (token, expert), zero for inactive experts."""
        return torch.zeros_like(self.probs).scatter(1, self.indices, self.gates)


def route(logits: torch.Tensor, top_k: int, soft: bool = False, normalize: bool = True) -> Routing:
    """Softmax over experts, then top-k; the gates are the chosen probabilities, renormalised to sum to 1
    over the chosen experts when `normalize` (transformers' `norm_topk_prob`; Mixtral, CoMoE, MoELoRA),
    or as they are (the Switch Transformer's top-1 gate p_i, Fedus et al. 2021, eq. 2). With top_k = 1
    a renormalised gate is p / p = 1 and gives the router no task gradient.

    Soft routing keeps every expert with its softmax weight: the same layout with k = n.
    Shapes: logits [T, n] -> probs [T, n] (float32), indices and gates [T, k].
    """
    probs = torch.softmax(logits.float(), dim=-1)
    if soft:
        indices = torch.arange(probs.shape[-1], device=probs.device).expand(probs.shape[0], -1)
        return Routing(probs, indices, probs)
    top_probs, indices = probs.topk(top_k, dim=-1)
    gates = top_probs / top_probs.sum(dim=-1, keepdim=True) if normalize else top_probs
    return Routing(probs, indices, gates)


@dataclass
class ExpertSort:
    """(token, expert) pairs sorted by expert, ScatterMoE-style: one gather, one grouped matmul."""

    order: torch.Tensor  # [T*k] positions in the flattened [T, k] routing, grouped by expert
    tokens: torch.Tensor  # [T*k] token index of each sorted pair
    experts: torch.Tensor  # [T*k] expert index of each sorted pair (non-decreasing)
    counts: torch.Tensor  # [n] pairs per expert
    offsets: torch.Tensor  # [n] int32 end of each expert's group (for grouped_mm)


def sort_by_expert(indices: torch.Tensor, num_experts: int) -> ExpertSort:
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    # scatter_add rather than bincount, which reads the largest index on the host (a GPU sync)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )
    return ExpertSort(
        order=order,
        tokens=order // indices.shape[1],
        experts=flat[order],
        counts=counts,
        offsets=torch.cumsum(counts, 0).to(torch.int32),
    )


class Router(nn.Linear):
    """Per-token gate logits W_g x over the experts, initialised as nn.Linear (small, symmetric)."""

    def __init__(self, in_features: int, num_experts: int) -> None:
        super().__init__(in_features, num_experts, bias=False)
