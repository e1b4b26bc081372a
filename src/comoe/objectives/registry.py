"""The registry of named auxiliary objectives: what each computes per layer, what it needs from the forward.

An objective turns one adapted layer's `LayerRecord` (routing, down-projections, and what it asked the
layer to keep) into a scalar loss; the auxiliary loss of a forward is, per objective, the mean over
adapted layers. `ComoeConfig.objective_weights` names the active ones with their weights
(`{name: weight}`: `balance_weight`, `contrastive` / `contrastive_weight` are sugar for entries of it, and
`aux_objectives` adds any other registered objective). A new objective is one module that calls
`register_objective` (see docs/design.md); nothing else is edited.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from comoe.config import ComoeConfig
from comoe.errors import PLUGIN_HINT, UnregisteredName
from comoe.moe.record import LayerRecord
from comoe.plugins import discover_once

# What an objective may ask the layers to keep beyond routing and down-projections (always recorded):
# "gram" -- the experts' Gram matrix B B^T, taken in the forward (where B is whole under FSDP);
# "norm_floor" -- the per-token floor of expert-output norms in cosines (contrastive_norm_floor);
# "logits" -- the router's logits W_g x [T, n] (the probabilities alone lose their logsumexp).
REQUIREMENTS = ("gram", "norm_floor", "logits")

LayerLoss = Callable[[LayerRecord, ComoeConfig], torch.Tensor]


@dataclass(frozen=True)
class Objective:
    """A named auxiliary objective.

    `loss(record, config)` is one layer's loss (a scalar tensor with a gradient); `component` is the name
    it is logged and reported under (`last_aux_losses()`, log.jsonl, Trainer logs): objectives of the
    same component are alternatives, at most one of them active; `needs` lists REQUIREMENTS entries.
    """

    name: str
    loss: LayerLoss
    component: str
    needs: frozenset[str] = frozenset()
    description: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.needs) - set(REQUIREMENTS)
        if unknown:
            raise ValueError(
                f"objective {self.name!r}: needs {sorted(unknown)} unknown; valid: {REQUIREMENTS}"
            )
        if self.component == "task":
            raise ValueError(f"objective {self.name!r}: component 'task' is the task loss's name")


OBJECTIVES: dict[str, Objective] = {}


def register_objective(objective: Objective) -> Objective:
    """Add (or replace) an objective under its name; returns it."""
    OBJECTIVES[objective.name] = objective
    return objective


def unregister_objective(name: str) -> None:
    """Remove a registered objective (tests register toy ones)."""
    OBJECTIVES.pop(name, None)


def get_objective(name: str) -> Objective:
    """The registered objective (after importing the plugins once if it is missing: comoe.plugins), or
    ValueError listing the registered names."""
    if name not in OBJECTIVES:
        discover_once()
    if name not in OBJECTIVES:
        registered = ", ".join(sorted(OBJECTIVES))
        raise UnregisteredName(
            f"auxiliary objective {name!r} is not registered; registered: {registered} ({PLUGIN_HINT})"
        )
    return OBJECTIVES[name]
