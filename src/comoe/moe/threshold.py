"""AdaMoLE's routing: a learned per-token threshold decides how many experts a token activates.

AdaMoLE (Liu & Luo, COLM 2024, arXiv 2405.00361; its release github.com/zefang-liu/AdaMoLE,
src/adamole/layer.py) gates each token with the router's softmax p = softmax(W_g x) and a threshold

    tau(x) = tau_max * sigmoid(w_tau . x + b),      tau_max = 1 / n,

computed by a threshold network (one linear [1, d_in] with a bias). Expert i is active for the token iff
p_i >= tau(x); the active experts are weighted by p_i - tau(x), renormalised to sum to 1. The number of
active experts varies per token, so the routing uses the k = n layout with gate 0 (and `Routing.active`
False) for the inactive experts.

An empty active set cannot occur in exact arithmetic: tau < tau_max = 1/n <= max_i p_i, so the most
probable expert always passes with a positive weight. Where float32 rounding makes a token's weights sum to
0 (sigmoid rounded to 1 and exactly uniform probabilities), its gates are 0 and the adapter adds nothing
to that token, as the release does (it divides by 1 where the sum is 0).
"""

from __future__ import annotations

import torch
from torch import nn

from comoe.moe.routing import Routing, RoutingKind, register_routing


def threshold_route(logits: torch.Tensor, threshold_logits: torch.Tensor) -> Routing:
    """AdaMoLE's gates from the router's logits [T, n] and the threshold network's logits [T, 1].

    probs = softmax(logits) [T, n] float32; tau = sigmoid(threshold_logits) / n [T, 1]; active = probs >=
    tau; gates = (probs - tau) on the active experts, renormalised per token ([T, n], 0 elsewhere and where
    the active weights sum to 0); indices = every expert ([T, n], the k = n layout). The gradient reaches
    the router through probs and the threshold network through tau. Source: arXiv 2405.00361, the
    release's AdaMoeLayer.forward."""
    probs = torch.softmax(logits.float(), dim=-1)
    tau = torch.sigmoid(threshold_logits.float()) / probs.shape[-1]
    excess = probs - tau
    active = excess >= 0
    weights = torch.where(active, excess, torch.zeros_like(excess))
    sums = weights.sum(dim=-1, keepdim=True)
    gates = weights / torch.where(sums == 0, torch.ones_like(sums), sums)
    indices = torch.arange(probs.shape[-1], device=probs.device).expand(probs.shape[0], -1)
    return Routing(probs, indices, gates, active)


class ThresholdRouting(RoutingKind):
    """AdaMoLE's routing (see the module): the router `router.weight` [n, d_in] and the threshold network
    `threshold.weight` [1, d_in], `threshold.bias` [1] (nn.Linear's initialisation, as the release)."""

    name = "threshold"
    dense = True

    @classmethod
    def shapes(cls, num_experts: int, in_features: int) -> dict[str, tuple[int, ...]]:
        return {
            **super().shapes(num_experts, in_features),
            "threshold.weight": (1, in_features),
            "threshold.bias": (1,),
        }

    @classmethod
    def create(cls, layer: nn.Module, factory: dict) -> None:
        super().create(layer, factory)
        layer.threshold = nn.Linear(layer.in_features, 1).to(**factory)

    @classmethod
    def route(cls, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        logits = layer.router(x)
        return logits, threshold_route(logits, layer.threshold(x))


THRESHOLD = register_routing(ThresholdRouting)
