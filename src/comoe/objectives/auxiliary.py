"""The auxiliary losses of a forward, from the LayerRecords the adapted layers left behind.

Contrastive objectives are registered by name in CONTRASTIVE_OBJECTIVES (the names ComoeConfig.contrastive
accepts): each turns one layer's record into a scalar loss, through the Gram-matrix cosines of
comoe.objectives.gram and the InfoNCE tails of the reference definitions, so the fast path and the
reference share everything but the cosines. A new objective is one function and one registry entry.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from comoe.config import ComoeConfig
from comoe.moe.experts import expert_gram
from comoe.moe.record import LayerRecord
from comoe.objectives.gram import anchor_cosines, item_cosines
from comoe.objectives.reference import (
    comoe_loss_from_anchor_cosines,
    load_balance_loss,
    sample_contrastive_tokens,
    supcon_loss,
)


def _gram(record: LayerRecord) -> torch.Tensor:
    return record.gram if record.gram is not None else expert_gram(record.lora_B)


def comoe_objective(record: LayerRecord, config: ComoeConfig) -> torch.Tensor:
    """CoMoE InfoNCE: activated experts are each other's positives, inactive ones the negatives."""
    indices = record.routing.indices
    rows = anchor_cosines(record.z, indices, _gram(record), record.norm_floor)
    return comoe_loss_from_anchor_cosines(
        rows,
        indices,
        config.temperature,
        config.anchor,
        record.mask,
        num_negatives=config.num_negatives,
        check=False,  # the router's topk: in range and distinct by construction
    )


def moelora_objective(record: LayerRecord, config: ComoeConfig) -> torch.Tensor:
    """MoELoRA: supervised contrastive loss over sampled (token, expert) outputs, labelled by expert."""
    indices = record.routing.indices
    tokens, topk = sample_contrastive_tokens(indices, record.mask, config.contrastive_max_tokens, None)
    experts = topk.flatten()
    item_tokens = tokens.repeat_interleave(topk.shape[1])
    floor = None if record.norm_floor is None else record.norm_floor[item_tokens]
    cosines = item_cosines(record.z[item_tokens, experts], experts, _gram(record), floor)
    return supcon_loss(cosines, experts, config.temperature)


Objective = Callable[[LayerRecord, ComoeConfig], torch.Tensor]
CONTRASTIVE_OBJECTIVES: dict[str, Objective] = {"comoe": comoe_objective, "moelora": moelora_objective}


def contrastive_loss(record: LayerRecord, config: ComoeConfig) -> torch.Tensor:
    """The configured contrastive objective of one layer."""
    return CONTRASTIVE_OBJECTIVES[config.contrastive](record, config)


def global_expert_fraction(record: LayerRecord) -> torch.Tensor | None:
    """f_i of the balance loss counted over every process's tokens (None with one process).

    Only the counts are shared: the gradient flows through each process's own mean probabilities, and the
    trainer's per-token weighting of the auxiliary loss then gives exactly the one-process gradient.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    routing = record.routing
    indices = routing.indices if record.mask is None else routing.indices[record.mask]
    counts = torch.bincount(indices.reshape(-1), minlength=routing.num_experts).double()
    dist.all_reduce(counts)
    return (counts / counts.sum().clamp_min(1)).to(routing.probs.dtype)


def balance_loss(record: LayerRecord, config: ComoeConfig) -> torch.Tensor:
    """Switch load balancing of one layer, with expert load counted locally or over all processes."""
    fraction = global_expert_fraction(record) if config.balance_scope == "global" else None
    return load_balance_loss(record.routing.probs, record.routing.indices, record.mask, fraction)


def auxiliary_losses(records: list[LayerRecord], config: ComoeConfig) -> dict[str, torch.Tensor]:
    """Balance and contrastive losses, each the mean over adapted layers (zero when turned off)."""
    balance = [balance_loss(r, config) for r in records] if config.balance_weight > 0 else []
    wants_contrastive = config.contrastive != "none" and config.contrastive_weight > 0
    contrastive = [contrastive_loss(r, config) for r in records] if wants_contrastive else []
    zero = torch.zeros((), device=records[0].z.device) if records else torch.zeros(())
    return {
        "balance": torch.stack(balance).mean() if balance else zero,
        "contrastive": torch.stack(contrastive).mean() if contrastive else zero,
    }
