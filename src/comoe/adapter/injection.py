"""Injection: which modules of a model become ComoeLinear layers (and trained copies), putting them in and
taking them out, and the adapter's tensor names and shapes -- known before anything is built.

The targets are PEFT's (`target_modules`, `layers_to_transform`, `modules_to_save`: adapter/targeting.py);
the experts' parameter names and shapes come from the configured expert bank (comoe.moe.banks), so the
shapes a saved file must have are known without allocating an expert.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from comoe.adapter.ffn import ComoeFFN, LoraLinear, check_disjoint, find_ffn_modules, mixlora_shapes
from comoe.adapter.layer import ComoeContext, ComoeLinear, layer_features
from comoe.adapter.saved import TrainedCopy
from comoe.adapter.streams import layer_streams
from comoe.adapter.targeting import (
    block_count,
    find_target_linears,
    layer_configs,
    layer_index,
    matches,
    resolve_targets,
    set_submodule,
)
from comoe.config import ComoeConfig
from comoe.moe.banks import get_bank
from comoe.moe.routing import get_routing


@dataclass
class Injection:
    """What `inject` put into a model: the adapted layers and the trained copies, by module path."""

    config: ComoeConfig  # with the default targets of the model's family resolved
    layers: dict[str, ComoeLinear | ComoeFFN]  # ComoeFFN: an MLP of FFN-block experts (ffn_experts)
    saved: dict[str, TrainedCopy]


def inject(model: nn.Module, config: ComoeConfig, context: ComoeContext) -> Injection:
    """Freeze `model` and replace the linears `config` targets by ComoeLinear layers (each told its token
    stream) and the modules_to_save by trained copies; ValueError naming targets that match nothing."""
    config = resolve_targets(model, config)
    targets = find_target_linears(model, config)
    ffns = find_ffn_modules(model, config)  # with ffn_experts: the MLPs, and plain LoRA on the targets
    check_disjoint(targets, ffns)
    saved = modules_to_save(model, config)
    for param in model.parameters():
        param.requires_grad_(False)
    streams = layer_streams(model, [*targets, *ffns])
    configs = layer_configs(model, config, [*targets, *ffns])  # experts_by_depth resolved per block
    linear_class = LoraLinear if ffns else ComoeLinear
    layers: dict[str, ComoeLinear | ComoeFFN] = {
        name: linear_class(linear, configs[name], context, streams[name]) for name, linear in targets.items()
    }
    layers.update({name: ComoeFFN(mlp, configs[name], context, streams[name]) for name, mlp in ffns.items()})
    for name, layer in layers.items():
        set_submodule(model, name, layer)
    copies = {name: TrainedCopy(module, context) for name, module in saved.items()}
    for name, copy_ in copies.items():
        set_submodule(model, name, copy_)
    return Injection(config, layers, copies)


def eject(model: nn.Module, injection: Injection) -> nn.Module:
    """Put the original layers (and modules_to_save originals) back; returns `model`, untouched."""
    for name, layer in injection.layers.items():
        set_submodule(model, name, layer.base_layer)
    for name, copy_ in injection.saved.items():
        set_submodule(model, name, copy_.original_module)
    return model


def adapter_shapes(
    targets: dict[str, nn.Module], config: ComoeConfig, num_blocks: int | None = None
) -> dict[str, tuple[int, ...]]:
    """The names and shapes of the experts and routers for these target layers, without building anything.
    With experts_by_depth, each layer's expert count is its block's among `num_blocks` blocks (the model's
    block_count; by default 1 + the largest block index of the targets)."""
    bank, routing = get_bank(config.expert_bank), get_routing(config.routing)
    if num_blocks is None:
        num_blocks = 1 + max((layer_index(name) or 0 for name in targets), default=0)
    r = config.r
    shapes = {}
    for name, linear in targets.items():
        n = config.experts_at(layer_index(name), num_blocks)
        d_in, d_out = layer_features(linear)
        for key, shape in bank.shapes(n, r, d_in, d_out).items():
            shapes[f"{name}.{key}"] = shape
        for key, shape in routing.shapes_for(config, n, d_in).items():
            shapes[f"{name}.{key}"] = shape
    return shapes


def modules_to_save(model: nn.Module, config: ComoeConfig) -> dict[str, nn.Module]:
    """The modules config.modules_to_save names (outermost matches), an error naming any that match none."""
    if not config.modules_to_save:
        return {}
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        inside = any(name.startswith(outer + ".") for outer in found)
        if name and not inside and matches(name, config.modules_to_save):
            found[name] = module
    unmatched = [t for t in config.modules_to_save if not any(matches(n, [t]) for n in found)]
    if unmatched:
        raise ValueError(f"modules_to_save: {unmatched} match no module of this {type(model).__name__}")
    return found


def saved_shapes(saved: dict[str, nn.Module]) -> dict[str, tuple[int, ...]]:
    """The names and shapes of the modules_to_save copies' parameters in the adapter file."""
    return {
        f"{name}.trained_module.{key}": tuple(param.shape)
        for name, module in saved.items()
        for key, param in module.named_parameters()
    }


def expected_shapes(model: nn.Module, config: ComoeConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape an adapter file of `config` must hold for `model` (not yet wrapped)."""
    config = resolve_targets(model, config)
    targets, ffns = find_target_linears(model, config), find_ffn_modules(model, config)
    if ffns:
        shapes = mixlora_shapes(targets, ffns, config, block_count(model))
    else:
        shapes = adapter_shapes(targets, config, block_count(model))
    shapes.update(saved_shapes(modules_to_save(model, config)))
    return shapes


def adapter_tensors(injection: Injection) -> dict[str, nn.Parameter]:
    """The adapter's parameters by file key: each layer's bank parameters and router, the trained copies."""
    state = {}
    for name, layer in injection.layers.items():
        if isinstance(layer, ComoeFFN):
            state.update({f"{name}.{key}": param for key, param in layer.adapter_parameters().items()})
            continue
        for key in layer.bank.shapes(layer.num_experts, layer.r, layer.in_features, layer.out_features):
            state[f"{name}.{key}"] = getattr(layer, key)
        for key in layer.routing_kind.shapes_for(layer.config, layer.num_experts, layer.in_features):
            state[f"{name}.{key}"] = layer.get_parameter(key)
    for name, copy_ in injection.saved.items():
        for key, param in copy_.trained_module.named_parameters():
            state[f"{name}.trained_module.{key}"] = param
    return state
