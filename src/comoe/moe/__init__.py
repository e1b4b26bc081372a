"""Mixture-of-experts mechanics shared by every adapter: routing, expert banks, mix strategies, kernels."""

from comoe.moe.banks import BANKS, ExpertBank, LoraExperts, get_bank, register_bank
from comoe.moe.experts import STRATEGIES, MixStrategy, expert_gram, mix, register_strategy
from comoe.moe.prompt import PROMPT  # registers the routing kind 'prompt' (MiLoRA)
from comoe.moe.routing import Router, Routing, route
from comoe.moe.threshold import THRESHOLD  # registers the routing kind 'threshold' (AdaMoLE)
from comoe.moe.triton_mix import TRITON  # registers the mix strategy 'triton' (CUDA, optional Triton)

__all__ = [
    "BANKS",
    "PROMPT",
    "STRATEGIES",
    "THRESHOLD",
    "TRITON",
    "ExpertBank",
    "LoraExperts",
    "MixStrategy",
    "Router",
    "Routing",
    "expert_gram",
    "get_bank",
    "mix",
    "register_bank",
    "register_strategy",
    "route",
]
