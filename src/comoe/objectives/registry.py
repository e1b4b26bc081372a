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
# "logits" -- the router's logits W_g x [T, n] (the probabilities alone lose their logsumexp);
# "task_ids" -- each sequence's task id [B] (record.task_ids): the model's call must carry task_ids.
REQUIREMENTS = ("gram", "norm_floor", "logits", "task_ids")

LayerLoss = Callable[[LayerRecord, ComoeConfig], torch.Tensor]
# (records of one group, config) -> [L] the per-layer losses of the records, in order, or None to use
# `loss` record by record. A group's records have the same shapes, dtypes, device and optional fields
# (comoe.objectives.auxiliary.record_group), so their tensors stack along a leading layer dimension.
BatchedLoss = Callable[[list[LayerRecord], ComoeConfig], "torch.Tensor | None"]


@dataclass(frozen=True)
class Objective:
    """A named auxiliary objective.

    `loss(record, config)` is one layer's loss (a scalar tensor with a gradient); `component` is the name
    it is logged and reported under (`last_aux_losses()`, log.jsonl, Trainer logs): objectives of the
    same component are alternatives, at most one of them active; `needs` lists REQUIREMENTS entries.
    `batched_loss` (optional) computes the loss of several layers of one shape at once (BatchedLoss): on
    a GPU the ops of an objective cost host time per call, so one call per group of layers instead of
    one per layer is what makes the objectives cheap; it must equal `loss` on every record (tested for
    the built-in objectives in tests/objectives/test_auxiliary.py).
    """

    name: str
    loss: LayerLoss
    component: str
    needs: frozenset[str] = frozenset()
    description: str = ""
    batched_loss: BatchedLoss | None = None

    def __post_init__(self) -> None:
        unknown = set(self.needs) - set(REQUIREMENTS)
        if unknown:
            raise ValueError(
                f"objective {self.name!r}: needs {sorted(unknown)} unknown; valid: {REQUIREMENTS}"
            )
        if self.component == "task":
            raise ValueError(f"objective {self.name!r}: component 'task' is the task loss's name")


def stacked(
    records: list[LayerRecord], field: Callable[[LayerRecord], torch.Tensor | None]
) -> torch.Tensor | None:
    """One field of records of one group stacked along a new leading dimension [L, ...] (None when the
    records do not carry it), for `batched_loss` implementations."""
    first = field(records[0])
    if first is None:
        return None
    return torch.stack([field(record) for record in records])


def stacked_norm_floors(records: list[LayerRecord]) -> torch.Tensor | None:
    """[L, T] the records' per-token norm floors (LayerRecord.norm_floor) of one group, scaled in one op
    (the layers record |W0 x| unscaled); None when the records carry no floor."""
    if records[0].base_norm is None:
        return None
    norms = torch.stack([record.base_norm for record in records]).view(len(records), -1)
    scales = [record.floor_scale for record in records]
    if len(set(scales)) == 1:
        return norms * scales[0]
    return norms * torch.tensor(scales, dtype=norms.dtype, device=norms.device).unsqueeze(-1)


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
