"""Routing: which experts see a token and with what weight, and the expert-sorted layout of that choice.

Routing is reduced to plain tensors once per layer call (probabilities, top-k indices, renormalised
gates); every later step (expert compute, balance and contrastive losses, analysis) reads those.

How a layer reaches that decision is a routing kind (`RoutingKind`, chosen with `ComoeConfig.routing`):
the router's parameters (names and shapes, which are also the adapter file's keys under the layer's
path) and the map from the layer's input to a `Routing`. `topk` (sparse top-k of a per-token softmax)
and `soft` (every expert, softmax-weighted) are built in; others register with `register_routing`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from comoe.errors import PLUGIN_HINT, UnregisteredName
from comoe.plugins import discover_once


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


class RoutingKind:
    """How an adapted layer routes its tokens (stateless, like an expert bank). Subclasses set `name` and
    `dense` and implement `route`; the default router is one `Router` (`router.weight` [n, d_in]).

    `route(layer, x)` reads the layer's `num_experts`, `top_k`, `normalize_gates`, its router parameters
    and, for kinds that need more than the token (a task id, the prompt), the per-call state on
    `layer.context`; it returns the router's logits [T, n] (kept for the router z-loss and analysis) and
    the `Routing` of the T tokens. A kind that activates a variable number of experts per token uses the
    k = n layout with zero gates for the inactive ones and sets `dense`."""

    name: ClassVar[str]
    dense: ClassVar[bool] = False  # whether any expert may be active for a token (the k = n layout)

    @classmethod
    def shapes(cls, num_experts: int, in_features: int) -> dict[str, tuple[int, ...]]:
        """Router parameter name (a path under the layer) -> shape; also the adapter file's keys."""
        return {"router.weight": (num_experts, in_features)}

    @classmethod
    def create(cls, layer: nn.Module, factory: dict) -> None:
        """Build the layer's router parameters on factory's device and dtype (nn.Linear's initialisation)."""
        layer.router = Router(layer.in_features, layer.num_experts).to(**factory)

    @classmethod
    def route(cls, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """x [T, d_in] (the router's input, in the router's dtype) -> (logits [T, n], Routing)."""
        raise NotImplementedError


class TopKRouting(RoutingKind):
    """Sparse top-k routing of a per-token softmax (Shazeer et al. 2017; CoMoE, MoELoRA, MixLoRA): `route`."""

    name = "topk"

    @classmethod
    def route(cls, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        logits = layer.router(x)
        return logits, route(logits, layer.top_k, normalize=layer.normalize_gates)


class SoftRouting(RoutingKind):
    """Every expert weighted by the router's softmax (MoLoRA, HydraLoRA, OMoE): `route(..., soft=True)`."""

    name = "soft"
    dense = True

    @classmethod
    def route(cls, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        logits = layer.router(x)
        return logits, route(logits, layer.num_experts, soft=True)


ROUTINGS: dict[str, type[RoutingKind]] = {}


def register_routing(kind: type[RoutingKind]) -> type[RoutingKind]:
    """Add (or replace) a routing kind under its name; returns it (usable as a class decorator)."""
    ROUTINGS[kind.name] = kind
    return kind


def unregister_routing(name: str) -> None:
    """Remove a registered routing kind (tests register toy ones)."""
    ROUTINGS.pop(name, None)


def get_routing(name: str) -> type[RoutingKind]:
    """The registered routing kind (after importing the plugins once if it is missing), or ValueError
    listing the registered names."""
    if name not in ROUTINGS:
        discover_once()
    if name not in ROUTINGS:
        raise UnregisteredName(
            f"routing={name!r} is not a registered routing kind; valid: {', '.join(ROUTINGS)} ({PLUGIN_HINT})"
        )
    return ROUTINGS[name]


register_routing(TopKRouting)
register_routing(SoftRouting)
