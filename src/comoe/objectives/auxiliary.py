"""The auxiliary losses of a forward: every active objective (registry.py) on every adapted layer's record.

Each component is the mean over adapted layers of the objective's per-layer loss (each a mean over real
tokens); its weighted value is weight * mean. `balance` and `contrastive` are always reported (zero when
off), other components when active. An objective with a `batched_loss` runs once per group of records of
one shape (record_group: e.g. q/o and k/v of a grouped-query-attention model are two groups), the others
once per record: on a GPU each op costs host time, so one call per group is what keeps objectives cheap.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from comoe.config import ComoeConfig
from comoe.moe.experts import expert_grams
from comoe.moe.record import LayerRecord

# The built-in objectives register themselves on import.
from comoe.objectives import balance as _balance  # noqa: F401
from comoe.objectives import contrastive as _contrastive  # noqa: F401
from comoe.objectives import localized_balance as _localized_balance  # noqa: F401
from comoe.objectives import router_z as _router_z  # noqa: F401
from comoe.objectives.registry import OBJECTIVES, Objective, get_objective
from comoe.plugins import discover_once

ALWAYS_REPORTED = ("balance", "contrastive")
logger = logging.getLogger(__name__)


def active_objectives(config: ComoeConfig) -> dict[str, tuple[Objective, float]]:
    """The config's objectives with positive weight, by name: (objective, weight). ValueError for an
    unregistered name or two active objectives of one component."""
    active: dict[str, tuple[Objective, float]] = {}
    components: dict[str, str] = {}
    for name, weight in config.objective_weights.items():
        objective = get_objective(name)
        if objective.component in components:
            raise ValueError(
                f"objectives {components[objective.component]!r} and {name!r} both report as "
                f"{objective.component!r}: activate one of them"
            )
        components[objective.component] = name
        active[name] = (objective, weight)
    return active


def usable_objectives(config: ComoeConfig, strict: bool = True) -> ComoeConfig:
    """`config` itself when every objective it names is registered. Otherwise, strict: ValueError naming
    the missing one (training needs it); not strict (an adapter loaded for inference, where the objectives
    only report): the config without the unregistered `aux_objectives`, saying so in a warning."""
    missing = [name for name in config.aux_objectives if name not in OBJECTIVES]
    if missing and discover_once():  # a plugin may register them
        missing = [name for name in missing if name not in OBJECTIVES]
    if not missing or strict:
        active_objectives(config)  # raises for the first missing name
        return config
    logger.warning(
        "auxiliary objective(s) %s are not registered in this process: the adapter runs, without computing "
        "them (import the module that registers them, e.g. with --plugin, to train or report them)",
        ", ".join(missing),
    )
    kept = {name: weight for name, weight in config.aux_objectives.items() if name not in missing}
    return dataclasses.replace(config, aux_objectives=kept)


def requirements(config: ComoeConfig) -> frozenset[str]:
    """What the active objectives need the layers to keep (REQUIREMENTS entries)."""
    needs: set[str] = set()
    for objective, _ in active_objectives(config).values():
        needs |= objective.needs
    if config.contrastive_norm_floor <= 0:
        needs.discard("norm_floor")
    return frozenset(needs)


@dataclass
class AuxiliaryLosses:
    """Per component: `values` the unweighted layer means (for logging), `weighted` weight * value (what
    the total loss adds); both scalar tensors with gradients."""

    values: dict[str, torch.Tensor] = field(default_factory=dict)
    weighted: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def total(self) -> torch.Tensor:
        """The weighted sum that enters the training loss (a zero tensor when nothing is active)."""
        return sum(self.weighted.values(), torch.zeros(()))


def _shape(tensor: torch.Tensor | None) -> tuple | None:
    return None if tensor is None else (tuple(tensor.shape), tensor.dtype, tensor.device)


def record_group(record: LayerRecord) -> Hashable:
    """The key under which records stack: the shapes, dtypes and devices of every tensor an objective may
    read (z [T, n, r], indices [T, k], B [n, r, d_out], the routing, mask, Gram matrix, floor, logits,
    materialised outputs), None for the absent ones."""
    routing = record.routing
    return tuple(
        _shape(tensor)
        for tensor in (
            record.z,
            routing.probs,
            routing.indices,
            routing.gates,
            record.lora_B,
            record.mask,
            record.gram,
            record.base_norm,
            record.logits,
            record.outputs,
        )
    )


def objective_mean(objective: Objective, records: list[LayerRecord], config: ComoeConfig) -> torch.Tensor:
    """The mean over records of the objective's per-layer loss: one `batched_loss` call per group of
    records of one shape where the objective has one (and it does not decline the group), `loss` per
    record otherwise."""
    if objective.batched_loss is None:
        return torch.stack([objective.loss(record, config) for record in records]).mean()
    groups: dict[Hashable, list[LayerRecord]] = {}
    for record in records:
        groups.setdefault(record_group(record), []).append(record)
    sums: list[torch.Tensor] = []
    for members in groups.values():
        batch = objective.batched_loss(members, config)
        if batch is None:
            batch = torch.stack([objective.loss(record, config) for record in members])
        if len(groups) == 1:
            return batch.mean()
        sums.append(batch.sum())
    return torch.stack(sums).sum() / len(records)


def with_grams(records: list[LayerRecord]) -> list[LayerRecord]:
    """The records with their Gram matrices B B^T: in one process the layers keep none (moe.experts.
    gram_in_forward), and the Grams of the records of one B shape are taken here in one batched matmul."""
    missing: dict[tuple, list[int]] = {}
    for index, record in enumerate(records):
        if record.gram is None and record.outputs is None:
            missing.setdefault(_shape(record.lora_B), []).append(index)
    if not missing:
        return records
    result = list(records)
    for indices in missing.values():
        grams = expert_grams(torch.stack([records[i].lora_B for i in indices]))
        for index, gram in zip(indices, grams.unbind(), strict=True):
            result[index] = dataclasses.replace(records[index], gram=gram)
    return result


def compute_auxiliary_losses(records: list[LayerRecord], config: ComoeConfig) -> AuxiliaryLosses:
    """Every active objective of `config` over the layers' records (their Gram matrices taken first when
    an objective needs them and the forward did not keep them: with_grams)."""
    if "gram" in requirements(config):
        records = with_grams(records)
    zero = torch.zeros((), device=records[0].z.device) if records else torch.zeros(())
    result = AuxiliaryLosses(dict.fromkeys(ALWAYS_REPORTED, zero), dict.fromkeys(ALWAYS_REPORTED, zero))
    for objective, weight in active_objectives(config).values():
        value = objective_mean(objective, records, config) if records else zero
        result.values[objective.component] = value
        result.weighted[objective.component] = weight * value
    return result


def auxiliary_losses(records: list[LayerRecord], config: ComoeConfig) -> dict[str, torch.Tensor]:
    """The unweighted component values of `compute_auxiliary_losses` (balance and contrastive always)."""
    return compute_auxiliary_losses(records, config).values


def contrastive_loss(record: LayerRecord, config: ComoeConfig) -> torch.Tensor:
    """The configured contrastive objective (`config.contrastive`) of one layer."""
    return get_objective(config.contrastive).loss(record, config)
