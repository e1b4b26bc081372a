"""The PEFT LoRA and DoRA baselines at comoe's capacity: the same target modules, the same trainable-parameter
count."""

from __future__ import annotations

import math

from peft import LoraConfig
from torch import nn

from comoe.adapter.layer import layer_features
from comoe.adapter.targeting import find_target_linears, layer_configs, resolve_targets
from comoe.config import ComoeConfig
from comoe.moe.banks import get_bank
from comoe.moe.routing import get_routing


def comoe_trainable_parameters(config: ComoeConfig, in_features: int, out_features: int) -> int:
    """Trainable parameters comoe adds to one linear layer: the expert bank's plus the routing kind's
    router parameters (RoutingKind.shapes_for); n * r * (d_in + d_out) + n * d_in for LoRA experts and a
    top-k router, + d_in + 1 for AdaMoLE's threshold network."""
    bank = get_bank(config.expert_bank)
    experts = bank.num_parameters(config.num_experts, config.r, in_features, out_features)
    router = get_routing(config.routing).shapes_for(config, config.num_experts, in_features)
    return experts + sum(math.prod(shape) for shape in router.values())


def matched_lora_config(config: ComoeConfig, model: nn.Module, use_dora: bool = False) -> LoraConfig:
    """A PEFT LoraConfig on the same modules whose trainable-parameter count matches comoe's.

    The rank is the integer nearest to (comoe parameters) / sum(d_in + d_out) over the targeted
    linears, so LoRA baselines are compared at equal capacity, as in the papers' tables. With `use_dora`
    (DoRA, Liu et al. 2024, arXiv 2402.09353: PEFT's `use_dora=True`), each adapted linear also trains a
    magnitude vector of d_out entries, which is counted first: the rank is the integer nearest to
    (comoe parameters - sum d_out) / sum(d_in + d_out), at least 1.
    """
    if config.ffn_experts is not None:
        raise ValueError(
            f"ffn_experts={config.ffn_experts!r}: the matched LoRA baseline counts per-linear experts only; "
            "match a LoRA to MixLoRA's FFN-block form by its own target_modules and r"
        )
    config = resolve_targets(model, config)
    targets = find_target_linears(model, config)
    configs = layer_configs(model, config, list(targets))  # experts_by_depth: each block's count
    shapes = [layer_features(m) for m in targets.values()]
    total = sum(
        comoe_trainable_parameters(configs[name], *layer_features(m)) for name, m in targets.items()
    )
    per_rank = sum(d_in + d_out for d_in, d_out in shapes)
    magnitudes = sum(d_out for _, d_out in shapes) if use_dora else 0
    rank = max(1, round((total - magnitudes) / per_rank))
    return LoraConfig(
        r=rank,
        lora_alpha=config.scaling * rank,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        layers_to_transform=config.layers_to_transform,
        modules_to_save=config.modules_to_save,
        task_type="CAUSAL_LM",
        use_dora=use_dora,
    )
