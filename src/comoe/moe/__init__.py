"""Mixture-of-experts mechanics shared by every adapter: routing, expert compute strategies, kernels."""

from comoe.moe.experts import STRATEGIES, down_project, expert_gram, mix
from comoe.moe.routing import Router, Routing, route

__all__ = ["STRATEGIES", "Router", "Routing", "down_project", "expert_gram", "mix", "route"]
