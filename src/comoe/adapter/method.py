"""Adapter methods: what training, checkpointing, integrations and analysis ask of "the method", whatever
it is -- a comoe preset (routed experts with auxiliary objectives) or the PEFT LoRA baseline.

Callers hold an `AdapterMethod` (`method_for(preset)` when building, `method_of(model)` for a built model)
and never test the model's class: a method without routing answers with empty layers, no auxiliary
losses and a no-op context. A further baseline is one class and one `register_method`: PEFT's LoRA
(`lora`) and DoRA (`dora`) are registered here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, ClassVar, Protocol

import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from torch import nn

from comoe.adapter.layer import ComoeLinear
from comoe.adapter.lora import matched_lora_config
from comoe.adapter.model import ComoeModel, get_comoe_model
from comoe.adapter.serialization import assign_weights
from comoe.config import ComoeConfig
from comoe.moe.record import LayerRecord
from comoe.objectives.auxiliary import ALWAYS_REPORTED


class AdapterMethod(Protocol):
    """The operations every adapter method offers (see the module docstring)."""

    name: str
    has_routing: bool

    def build(self, base: nn.Module, config: ComoeConfig, gradient_checkpointing: bool) -> nn.Module:
        """`base` (frozen) with this method's adapter, for the comoe `config` (for baselines: the config
        whose targets and trainable-parameter count they match)."""
        ...

    def owns(self, model: nn.Module) -> bool:
        """Whether `model` (unwrapped from DDP/FSDP) carries this method's adapter."""
        ...

    def routed_layers(self, model: nn.Module) -> dict[str, ComoeLinear]:
        """The routed layers by module path (empty without routing)."""
        ...

    def record_routing(self, model: nn.Module) -> contextlib.AbstractContextManager[dict[str, LayerRecord]]:
        """A block inside which each forward's layer records are kept (an empty dict without routing)."""
        ...

    def caller_adds_aux_loss(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """A block inside which a training forward leaves the weighted auxiliary loss to the caller."""
        ...

    def weighted_aux_loss(self, model: nn.Module) -> torch.Tensor:
        """The weighted auxiliary loss of the last forward (a zero tensor without one)."""
        ...

    def aux_components(self, model: nn.Module) -> dict[str, float]:
        """The last forward's auxiliary loss components by name (task not included)."""
        ...

    def load_adapter_state(self, model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Load adapter tensors as saved in an adapter folder (names as in its safetensors file)."""
        ...


class ComoeMethod:
    """A comoe preset: routed mixtures of LoRA experts with the config's auxiliary objectives."""

    name: ClassVar[str] = "comoe"
    has_routing: ClassVar[bool] = True

    def build(self, base: nn.Module, config: ComoeConfig, gradient_checkpointing: bool) -> nn.Module:
        model = get_comoe_model(base, config)
        if gradient_checkpointing:
            model.activation_checkpointing_enable()
        return model

    def owns(self, model: nn.Module) -> bool:
        return isinstance(model, ComoeModel)

    def routed_layers(self, model: nn.Module) -> dict[str, ComoeLinear]:
        # plain LoRA linears (beside FFN-block experts) have no router
        return {name: layer for name, layer in model.comoe_layers().items() if layer.router is not None}

    def record_routing(self, model: nn.Module) -> contextlib.AbstractContextManager[dict[str, LayerRecord]]:
        return model.record_routing()

    def caller_adds_aux_loss(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        return model.caller_adds_aux_loss()

    def weighted_aux_loss(self, model: nn.Module) -> torch.Tensor:
        return model.weighted_aux_loss

    def aux_components(self, model: nn.Module) -> dict[str, float]:
        return {name: value for name, value in model.last_aux_losses().items() if name != "task"}

    def load_adapter_state(self, model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
        assign_weights(model.adapter_state_dict(), tensors, source)


class PeftLoraMethod:
    """The LoRA baseline through PEFT, on comoe's target modules at its trainable-parameter count
    (matched_lora_config); no routing, no auxiliary losses."""

    name: ClassVar[str] = "lora"
    has_routing: ClassVar[bool] = False
    use_dora: ClassVar[bool] = False

    def build(self, base: nn.Module, config: ComoeConfig, gradient_checkpointing: bool) -> nn.Module:
        if gradient_checkpointing:
            base.activation_checkpointing_enable()  # non-reentrant: no input grads needed
        return get_peft_model(base, matched_lora_config(config, base, use_dora=self.use_dora))

    def owns(self, model: nn.Module) -> bool:
        if not isinstance(model, PeftModel):
            return False
        peft_config = model.peft_config.get(model.active_adapter)
        return bool(getattr(peft_config, "use_dora", False)) == self.use_dora

    def routed_layers(self, model: nn.Module) -> dict[str, ComoeLinear]:
        return {}

    @contextlib.contextmanager
    def record_routing(self, model: nn.Module) -> Iterator[dict[str, LayerRecord]]:
        yield {}

    def caller_adds_aux_loss(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def weighted_aux_loss(self, model: nn.Module) -> torch.Tensor:
        return torch.zeros(())

    def aux_components(self, model: nn.Module) -> dict[str, float]:
        return dict.fromkeys(ALWAYS_REPORTED, 0.0)  # reported as zero, as a comoe preset's inactive ones

    def load_adapter_state(self, model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
        set_peft_model_state_dict(model, tensors)


class PeftDoraMethod(PeftLoraMethod):
    """The DoRA baseline through PEFT (Liu et al., ICML 2024, arXiv 2402.09353; `LoraConfig(use_dora=True)`):
    LoRA's low-rank update of the direction, W' = m * (W0 + s B A) / ||W0 + s B A|| column-wise, with a
    trained magnitude m per output feature. Built as the LoRA baseline is, its rank matched to comoe's count
    with the magnitude vectors counted (matched_lora_config); no routing, no auxiliary losses. Its adapter
    state (lora_A, lora_B, lora_magnitude_vector) saves and loads through PEFT."""

    name: ClassVar[str] = "dora"
    use_dora: ClassVar[bool] = True


METHODS: dict[str, AdapterMethod] = {}


def register_method(method: AdapterMethod) -> AdapterMethod:
    """Add (or replace) a method under its name; returns it."""
    METHODS[method.name] = method
    return method


COMOE = register_method(ComoeMethod())
LORA = register_method(PeftLoraMethod())
DORA = register_method(PeftDoraMethod())


def method_for(preset: str) -> AdapterMethod:
    """The method that trains a preset: a registered method's own name (e.g. 'lora', 'dora'), else comoe
    (every comoe preset)."""
    return METHODS.get(preset, COMOE)


def method_of(model: nn.Module) -> AdapterMethod | None:
    """The method whose adapter `model` carries (unwrapped from DDP/FSDP's `module`), or None."""
    inner = getattr(model, "module", model)
    return next((method for method in METHODS.values() if method.owns(inner)), None)


def save_adapter(model: nn.Module, folder: str | os.PathLike, **options: Any) -> None:
    """`model.save_pretrained(folder, **options)` for any method's adapter. A PEFT baseline saves with
    `save_embedding_layers=False`: its LoRA targets linears only (matched_lora_config) and comoe never
    resizes the vocabulary, so the base embeddings are never trained, and PEFT's default 'auto' would look
    the base model's name up on the Hugging Face Hub (a network request, and the warnings "Unable to fetch
    remote file" and "Could not find a config file in <base>" offline). Modules in `modules_to_save` are
    saved whatever this flag says (PEFT's AuxiliaryTrainingWrapper state, embeddings included)."""
    if isinstance(getattr(model, "module", model), PeftModel):
        options.setdefault("save_embedding_layers", False)
    model.save_pretrained(folder, **options)
