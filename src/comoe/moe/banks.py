"""Expert banks: how the n experts of an adapted linear are parameterised (PEFT's `LoraVariant` idea).

A bank is a stateless class that says which parameters a layer holds for its experts (names and shapes,
which are also the adapter file's tensor names under the layer's path), how they are initialised, and how
the layer turns its input into the experts' down-projections `z [T, n, r]` and reads their up-projections
`B [n, r, d_out]`. Everything after that -- routing, the mix strategies, the Gram-path objectives,
analysis -- reads only `z` and `B`, so an architecture variant is one class and one `register_bank` call,
chosen with `ComoeConfig.expert_bank`: `lora` (independent LoRA experts, the default) and `hydra`
(HydraLoRA's one shared A and n B heads) are built in.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from comoe.errors import PLUGIN_HINT, UnregisteredName
from comoe.plugins import discover_once

Shape = tuple[int, ...]


class ExpertBank:
    """The experts' parameters of one layer. Subclasses set `name` and implement the four methods."""

    name: ClassVar[str]

    @classmethod
    def shapes(
        cls, num_experts: int, r: int, in_features: int, out_features: int
    ) -> dict[str, tuple[int, ...]]:
        """Parameter name -> shape; the names become attributes of the layer and adapter-file keys."""
        raise NotImplementedError

    @classmethod
    def reset_parameters(cls, layer: nn.Module) -> None:
        """Initialise the layer's expert parameters so that its experts' outputs are exactly zero."""
        raise NotImplementedError

    @classmethod
    def down_project(cls, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """z[t, i] = A_i x_t: [T, d_in] -> [T, n, r], every expert for every token."""
        raise NotImplementedError

    @classmethod
    def up_weight(cls, layer: nn.Module) -> torch.Tensor:
        """The experts' up-projections as [n, r, d_out] (a view where possible; gradients flow through)."""
        raise NotImplementedError

    @classmethod
    def num_parameters(cls, num_experts: int, r: int, in_features: int, out_features: int) -> int:
        """Trainable parameters of the experts of one layer (the router's n * d_in not included)."""
        return sum(
            math.prod(shape) for shape in cls.shapes(num_experts, r, in_features, out_features).values()
        )

    @classmethod
    def create(cls, layer: nn.Module, num_experts: int, r: int, factory: dict) -> None:
        """Register the parameters on `layer` (empty, on factory's device and dtype), then initialise them."""
        shapes = cls.shapes(num_experts, r, layer.in_features, layer.out_features)
        for name, shape in shapes.items():
            layer.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
        cls.reset_parameters(layer)


class LoraExperts(ExpertBank):
    """n independent LoRAs: A stored [n, r, d_in] (PEFT's lora_A.weight per expert, Kaiming-uniform with
    a = sqrt(5) as PEFT initialises it), B stored [n, r, d_out] (the transpose of PEFT's lora_B.weight, so
    the mix strategies use it without a copy), zero-initialised. CoMoE (arXiv 2505.17553) and MoELoRA
    (arXiv 2402.12851) experts."""

    name = "lora"

    @classmethod
    def shapes(
        cls, num_experts: int, r: int, in_features: int, out_features: int
    ) -> dict[str, tuple[int, ...]]:
        return {"lora_A": (num_experts, r, in_features), "lora_B": (num_experts, r, out_features)}

    @classmethod
    def reset_parameters(cls, layer: nn.Module) -> None:
        with torch.no_grad():
            for expert in layer.lora_A:
                nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
            layer.lora_B.zero_()

    @classmethod
    def down_project(cls, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        n, r, d_in = layer.lora_A.shape
        return (x @ layer.lora_A.reshape(n * r, d_in).t()).view(-1, n, r)

    @classmethod
    def up_weight(cls, layer: nn.Module) -> torch.Tensor:
        return layer.lora_B


class HydraExperts(ExpertBank):
    """HydraLoRA (Tian et al., NeurIPS 2024, arXiv 2404.19245): one down-projection A [r, d_in] shared by
    every expert and n up-projection heads B [n, r, d_out], so expert i is B_i A. Initialised as the
    paper's code initialises its layers (A Kaiming-uniform with a = sqrt(5), every head zero), so the
    experts' outputs start at exactly zero. `down_project` returns the one z = A x as an [T, n, r] view
    (expanded, no copy): the mix strategies and the Gram-path objectives read it as n experts whose
    down-projections happen to coincide. Trainable parameters: r * d_in + n * r * d_out."""

    name = "hydra"

    @classmethod
    def shapes(
        cls, num_experts: int, r: int, in_features: int, out_features: int
    ) -> dict[str, tuple[int, ...]]:
        return {"lora_A": (r, in_features), "lora_B": (num_experts, r, out_features)}

    @classmethod
    def reset_parameters(cls, layer: nn.Module) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))
            layer.lora_B.zero_()

    @classmethod
    def down_project(cls, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return (x @ layer.lora_A.t()).unsqueeze(1).expand(-1, layer.lora_B.shape[0], -1)

    @classmethod
    def up_weight(cls, layer: nn.Module) -> torch.Tensor:
        return layer.lora_B


BANKS: dict[str, type[ExpertBank]] = {}


def register_bank(bank: type[ExpertBank]) -> type[ExpertBank]:
    """Add (or replace) an expert bank under its name; returns it (usable as a class decorator)."""
    BANKS[bank.name] = bank
    return bank


def unregister_bank(name: str) -> None:
    """Remove a registered bank (tests register toy ones)."""
    BANKS.pop(name, None)


def get_bank(name: str) -> type[ExpertBank]:
    """The registered bank (after importing the plugins once if it is missing: comoe.plugins), or ValueError
    listing the registered names."""
    if name not in BANKS:
        discover_once()
    if name not in BANKS:
        raise UnregisteredName(
            f"expert_bank={name!r} is not a registered expert bank; valid: {', '.join(BANKS)} ({PLUGIN_HINT})"
        )
    return BANKS[name]


register_bank(LoraExperts)
register_bank(HydraExperts)
