"""Which modules of a base model an adapter config selects, and how to swap a module in place.

Shared by comoe adapters, the matched PEFT LoRA baseline (same modules, same parameter count) and the
analysis (which groups layers by transformer block through `layer_index`).
"""

from __future__ import annotations

import difflib
import re

from torch import nn

from comoe.adapter.layer import ComoeLinear
from comoe.config import ComoeConfig

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The transformer block index in a module path ('model.layers.3.self_attn.q_proj' -> 3), if any."""
    found = _LAYER_INDEX.search("." + name + ".")
    return int(found.group(1)) if found else None


def is_target(name: str, config: ComoeConfig) -> bool:
    """PEFT's rule: a list of names matches path suffixes; one string is a regex over the whole path."""
    targets = config.target_modules
    if isinstance(targets, str):
        matched = re.fullmatch(targets, name) is not None
    else:
        matched = any(name == t or name.endswith("." + t) for t in targets)
    if matched and config.layers_to_transform is not None:
        matched = layer_index(name) in config.layers_to_transform
    return matched


def find_target_linears(model: nn.Module, config: ComoeConfig) -> dict[str, nn.Linear]:
    """The nn.Linear modules that config.target_modules selects; a clear error when none or a non-Linear,
    or when comoe has already been applied to the model."""
    found: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if not name or not is_target(name, config):
            continue
        if isinstance(module, ComoeLinear):
            raise ValueError(
                f"target_modules: {name!r} is already a comoe layer; apply comoe to a model only once "
                "(call unload() first to start again)"
            )
        if not isinstance(module, nn.Linear):
            if any(isinstance(child, ComoeLinear) for child in module.modules()):
                continue  # the ComoeLinear wrapper's own children are reported above
            raise ValueError(
                f"target_modules: {name!r} is a {type(module).__name__}; comoe adapts nn.Linear layers only"
            )
        found[name] = module
    if any(isinstance(m, ComoeLinear) for m in model.modules()):
        raise ValueError("model: comoe has already been applied to this model; apply it once")
    if not found:
        raise ValueError(_no_match_message(model, config))
    return found


def _no_match_message(model: nn.Module, config: ComoeConfig) -> str:
    linear_names = sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    )
    wanted = [config.target_modules] if isinstance(config.target_modules, str) else config.target_modules
    close = sorted({c for t in wanted for c in difflib.get_close_matches(t, linear_names, n=3, cutoff=0.8)})
    hint = f"; close matches: {close}" if close else ""
    return (
        f"target_modules={config.target_modules!r} matches no nn.Linear in the model"
        + (f" (with layers_to_transform={config.layers_to_transform})" if config.layers_to_transform else "")
        + f"{hint}; the model's linear layers are named {linear_names}"
    )


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
