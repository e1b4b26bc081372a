"""The contrastive expert objectives, CoMoE and MoELoRA, on the Gram-matrix fast path; their registration.

Each turns one layer's record into a scalar loss through the cosines of comoe.objectives.gram and the
InfoNCE tails of comoe.objectives.infonce: the reference definitions (comoe.objectives.reference) share
the tails, so the fast path and the reference differ in how the cosines are computed only (tested equal
in value and gradients). A record that carries the experts' materialised outputs (a bank whose outputs are
not s B_i^T z_i, e.g. DoRA experts) takes the plain cosines of those instead (comoe.objectives.cosine).
"""

from __future__ import annotations

import torch

from comoe.config import ComoeConfig
from comoe.moe.experts import expert_gram
from comoe.moe.record import LayerRecord
from comoe.objectives.cosine import output_anchor_cosines, output_item_cosines
from comoe.objectives.gram import anchor_cosines, item_cosines
from comoe.objectives.infonce import comoe_loss_from_anchor_cosines, sample_contrastive_tokens, supcon_loss
from comoe.objectives.registry import Objective, register_objective

CONTRASTIVE_NEEDS = frozenset({"gram", "norm_floor"})


def record_gram(record: LayerRecord) -> torch.Tensor:
    """The experts' Gram matrix B B^T [n*r, n*r]: the one the forward kept, else computed from B."""
    return record.gram if record.gram is not None else expert_gram(record.lora_B)


def comoe_objective(record: LayerRecord, config: ComoeConfig) -> torch.Tensor:
    """CoMoE InfoNCE (arXiv 2505.17553, Algorithm 1): activated experts are each other's positives,
    inactive ones the negatives. Scalar: the mean over real tokens (and anchors)."""
    indices = record.routing.indices
    if record.outputs is not None:
        rows = output_anchor_cosines(record.outputs, indices, record.norm_floor)
    else:
        rows = anchor_cosines(record.z, indices, record_gram(record), record.norm_floor)
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
    """MoELoRA (arXiv 2402.12851; our reading): supervised contrastive loss over sampled (token, expert)
    outputs, labelled by expert. Scalar: the mean over items with a positive."""
    indices = record.routing.indices
    tokens, topk = sample_contrastive_tokens(indices, record.mask, config.contrastive_max_tokens, None)
    experts = topk.flatten()
    item_tokens = tokens.repeat_interleave(topk.shape[1])
    floor = None if record.norm_floor is None else record.norm_floor[item_tokens]
    if record.outputs is not None:
        cosines = output_item_cosines(record.outputs[item_tokens, experts], floor)
    else:
        cosines = item_cosines(record.z[item_tokens, experts], experts, record_gram(record), floor)
    return supcon_loss(cosines, experts, config.temperature)


COMOE = register_objective(
    Objective(
        "comoe",
        comoe_objective,
        component="contrastive",
        needs=CONTRASTIVE_NEEDS,
        description="CoMoE InfoNCE among activated vs inactive experts (arXiv 2505.17553)",
    )
)
MOELORA = register_objective(
    Objective(
        "moelora",
        moelora_objective,
        component="contrastive",
        needs=CONTRASTIVE_NEEDS,
        description="MoELoRA supervised contrastive loss by expert identity (arXiv 2402.12851)",
    )
)
