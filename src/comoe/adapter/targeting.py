"""Which modules of a base model an adapter config selects, and how to swap a module in place.

Shared by comoe adapters, the matched PEFT LoRA baseline (same modules, same parameter count) and the
analysis (which groups layers by transformer block through `layer_index`).

The default targets (ATTENTION_MODULES: q/k/v/o_proj) name the attention projections of Llama-style
families. On a family that names or fuses them differently, `resolve_targets` keeps the default names the
model has and adds PEFT's own default targets for its model type (TRANSFORMERS_MODELS_TO_LORA_TARGET_
MODULES_MAPPING: c_attn for GPT-2, query_key_value for GPT-NeoX, query/value for BERT, q/v for T5) and
any fused attention projection it has (Phi-3's qkv_proj), saying what it chose. Explicit targets are
taken as given, with a warning naming those that match nothing. PEFT's shorthand "all-linear" becomes
every linear (and Conv1D) layer except the output head, as PEFT resolves it.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import warnings

from torch import nn

from comoe.adapter.layer import ADAPTABLE, ComoeLinear
from comoe.config import ATTENTION_MODULES, ComoeConfig

ALL_LINEAR = "all-linear"  # PEFT's shorthand (INCLUDE_LINEAR_LAYERS_SHORTHAND), any case

# Fused projections that hold the attention's query/key/value in one linear, by family.
FUSED_ATTENTION = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "W_pack")

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The transformer block index in a module path ('model.layers.3.self_attn.q_proj' -> 3), if any."""
    found = _LAYER_INDEX.search("." + name + ".")
    return int(found.group(1)) if found else None


def block_count(model: nn.Module) -> int:
    """How many transformer blocks `model` has: 1 + the largest block index in its module paths (0: none)."""
    indices = [layer_index(name) for name, _ in model.named_modules() if name]
    return 1 + max((i for i in indices if i is not None), default=-1)


def layer_configs(model: nn.Module, config: ComoeConfig, names: list[str]) -> dict[str, ComoeConfig]:
    """Each named linear's own configuration: `config` with experts_by_depth resolved for the linear's
    block among the model's blocks (MoLA); `config` itself for every linear without experts_by_depth."""
    num_blocks = block_count(model) if config.experts_by_depth is not None else 0
    resolved: dict[int | None, ComoeConfig] = {}
    for name in names:
        block = layer_index(name)
        if block not in resolved:
            resolved[block] = config.at_depth(block, num_blocks)
    return {name: resolved[layer_index(name)] for name in names}


def matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a list of names matches path suffixes; one string is a regex over the whole path."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def is_target(name: str, config: ComoeConfig) -> bool:
    matched = matches(name, config.target_modules)
    if matched and config.layers_to_transform is not None:
        matched = layer_index(name) in config.layers_to_transform
    return matched


def peft_default_targets() -> dict[str, list[str]]:
    """PEFT's default LoRA targets per model type. Imported here, when a default needs resolving, because
    `import comoe` and a ComoeModel on a Llama-style model must not pay for importing peft (~1 s)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    return TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def resolve_targets(model: nn.Module, config: ComoeConfig) -> ComoeConfig:
    """The config with target_modules made concrete for this model (see the module docstring); the result
    is what the adapter folder records, so a reload adapts exactly the same layers."""
    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        return dataclasses.replace(config, target_modules=all_linear_targets(model))
    if isinstance(targets, str):
        return config
    missing = [t for t in targets if not any(matches(n, [t]) for n, _ in model.named_modules() if n)]
    if not missing:
        return config
    leaves = set(adaptable_names(model))
    model_type = _model_type(model)
    peft_targets = peft_default_targets()
    if targets == ATTENTION_MODULES:
        present = [t for t in targets if t not in missing]
        added = [t for t in peft_targets.get(model_type or "", []) if t in leaves and t not in present]
        added += [t for t in FUSED_ATTENTION if t in leaves and t not in present + added]
        if added:
            return dataclasses.replace(config, target_modules=present + added)
        return config  # find_target_linears says what the model has
    if len(missing) < len(targets):
        suggestion = peft_targets.get(model_type or "")
        hint = f"; PEFT's default for {model_type} is {suggestion}" if suggestion else ""
        fused = [t for t in FUSED_ATTENTION + ("gate_up_proj",) if t in leaves and t not in targets]
        hint += f"; it has fused projections {fused}" if fused else ""
        warnings.warn(
            f"target_modules: {missing} match nothing in this {type(model).__name__}, so those projections "
            f"are not adapted (adapting {[t for t in targets if t not in missing]}){hint}",
            stacklevel=3,
        )
    return config


def output_head_names(model: nn.Module) -> set[str]:
    """The module path(s) of the model's output embedding (lm_head), which "all-linear" leaves out."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def all_linear_targets(model: nn.Module) -> list[str]:
    """PEFT's "all-linear" for this model: every nn.Linear / Conv1D except the output head, as a target
    list -- the layers' names (q_proj, c_fc, ...) where every module so named is such a layer, else the
    full paths of those that are -- so the adapter folder records the layers and a reload adapts the same."""
    heads = output_head_names(model)
    modules = [(name, module) for name, module in model.named_modules() if name]
    linears = {name for name, module in modules if isinstance(module, ADAPTABLE) and name not in heads}
    if not linears:
        raise ValueError(
            f"target_modules='{ALL_LINEAR}': this {type(model).__name__} has no nn.Linear or Conv1D layer "
            f"besides its output head {sorted(heads)}"
        )
    targets: list[str] = []
    for leaf in sorted({name.rsplit(".", 1)[-1] for name in linears}):
        named = [name for name, _ in modules if matches(name, [leaf])]
        targets += [leaf] if all(name in linears for name in named) else sorted(set(named) & linears)
    return sorted(targets)


def adaptable_names(model: nn.Module) -> list[str]:
    """The last path component of every layer comoe can adapt (q_proj, c_attn, ...), sorted, once each."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, ADAPTABLE)})


def fused_experts(model: nn.Module) -> list[str]:
    """'path [shape]' of each 3-D parameter of a base model's routed experts (Mixtral, Qwen2-MoE in
    transformers 5 fuse all experts' projections into one parameter), which no linear target reaches."""
    return [
        f"{name} {list(param.shape)}"
        for name, param in model.named_parameters()
        if param.dim() == 3 and ".experts." in f".{name}" and "lora_" not in name
    ]


def find_target_linears(model: nn.Module, config: ComoeConfig) -> dict[str, nn.Module]:
    """The linear (or Conv1D) modules that config.target_modules selects; a clear error when none, or a
    module of another kind, or when comoe has already been applied to the model."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or not is_target(name, config):
            continue
        if isinstance(module, ComoeLinear):
            raise ValueError(
                f"target_modules: {name!r} is already a comoe layer; apply comoe to a model only once "
                "(call unload() first to start again)"
            )
        if not isinstance(module, ADAPTABLE):
            if any(isinstance(child, ComoeLinear) for child in module.modules()):
                continue  # the ComoeLinear wrapper's own children are reported above
            fused = [p for p in fused_experts(model) if p.startswith(name + ".")]
            detail = f" holding fused expert parameters {fused[:2]}" if fused else ""
            raise ValueError(
                f"target_modules: {name!r} is a {type(module).__name__}{detail}; comoe adapts nn.Linear "
                "and Conv1D layers only (name the linear layers inside it, or leave it out)"
            )
        found[name] = module
    if any(isinstance(m, ComoeLinear) for m in model.modules()):
        raise ValueError("model: comoe has already been applied to this model; apply it once")
    if not found:
        raise ValueError(_no_match_message(model, config))
    fused = fused_experts(model)
    if fused:
        warnings.warn(
            f"the base model's routed experts are fused 3-D parameters ({fused[0]}, ...): no linear target "
            "reaches them, so they stay frozen; MLP target names match only a shared expert, if any",
            stacklevel=3,
        )
    return found


def _no_match_message(model: nn.Module, config: ComoeConfig) -> str:
    linear_names = adaptable_names(model)
    wanted = [config.target_modules] if isinstance(config.target_modules, str) else config.target_modules
    close = sorted({c for t in wanted for c in difflib.get_close_matches(t, linear_names, n=3, cutoff=0.8)})
    hint = f"; close matches: {close}" if close else ""
    return (
        f"target_modules={config.target_modules!r} matches no nn.Linear or Conv1D in the model"
        + (f" (with layers_to_transform={config.layers_to_transform})" if config.layers_to_transform else "")
        + f"{hint}; the model's linear layers are named {linear_names}"
    )


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
