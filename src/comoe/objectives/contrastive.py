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
from comoe.moe.experts import expert_gram, expert_grams
from comoe.moe.record import LayerRecord
from comoe.objectives.cosine import output_anchor_cosines, output_item_cosines
from comoe.objectives.gram import anchor_dots, item_cosines
from comoe.objectives.gram_infonce import gram_comoe_loss
from comoe.objectives.infonce import (
    comoe_loss_from_anchor_cosines,
    contrastive_items,
    sample_contrastive_tokens,
    supcon_loss,
)
from comoe.objectives.registry import Objective, register_objective, stacked, stacked_norm_floors
from comoe.objectives.triton_infonce import fused_comoe_applies, fused_comoe_loss

CONTRASTIVE_NEEDS = frozenset({"gram", "norm_floor"})


def record_gram(record: LayerRecord) -> torch.Tensor:
    """The experts' Gram matrix B B^T [n*r, n*r]: the one the forward kept, else computed from B."""
    return record.gram if record.gram is not None else expert_gram(record.lora_B)


def stacked_grams(records: list[LayerRecord]) -> torch.Tensor:
    """[L, n*r, n*r] the Gram matrices of one group: the ones the forward kept (several processes), else
    computed from the stacked B in one batched matmul."""
    if records[0].gram is not None:
        base = _stacked_base(records)
        return base if base is not None else torch.stack([record.gram for record in records])
    return expert_grams(stacked(records, lambda record: record.lora_B))


def _stacked_base(records: list[LayerRecord]) -> torch.Tensor | None:
    """The [L, n*r, n*r] tensor the records' grams are the rows of, in order (auxiliary.with_grams takes
    one group's Grams in one matmul and hands them out as views), so it is not stacked again; else None."""
    base = records[0].gram._base
    if base is None or base.dim() != 3 or base.shape[0] != len(records):
        return None
    for index, record in enumerate(records):
        gram = record.gram
        if gram._base is not base or gram.storage_offset() != base.storage_offset() + index * base.stride(0):
            return None
    return base


def comoe_batched(records: list[LayerRecord], config: ComoeConfig) -> torch.Tensor | None:
    """`comoe_objective` of every record of one group (same shapes: comoe.objectives.auxiliary) at once,
    [L]: the records' z, indices, Gram matrices, floors and masks stacked along a leading layer dimension,
    into the fused Triton kernel (CUDA, the default setting) or the one autograd Function of
    comoe.objectives.gram_infonce (any setting); for records that carry materialised outputs (DoRA
    experts), the outputs' plain cosines instead."""
    indices = stacked(records, lambda record: record.routing.indices)
    floor = stacked_norm_floors(records)
    mask = stacked(records, lambda record: record.mask)
    if records[0].outputs is None:
        grams = stacked_grams(records)
        z = stacked(records, lambda record: record.z)
        if takes_fused_kernel(z, indices, config):
            return comoe_fused(z, indices, grams, floor, mask, config)
        return gram_comoe_loss(
            z, indices, grams, config.temperature, mask, floor, config.anchor, config.num_negatives
        )
    rows = output_anchor_cosines(stacked(records, lambda record: record.outputs), indices, floor)
    return comoe_loss_from_anchor_cosines(
        rows, indices, config.temperature, config.anchor, mask, num_negatives=config.num_negatives,
        check=False,  # the router's topk: in range and distinct by construction
    )  # fmt: skip


def takes_fused_kernel(z: torch.Tensor, indices: torch.Tensor, config: ComoeConfig) -> bool:
    """Whether CoMoE on z [..., T, n, r] and indices [..., T, k] runs the fused Triton kernel (CUDA)."""
    n, k = z.shape[-2], indices.shape[-1]
    return fused_comoe_applies(z.device.type, config.anchor, config.num_negatives, n, k)


def comoe_fused(
    z: torch.Tensor,
    indices: torch.Tensor,
    gram: torch.Tensor,
    floor: torch.Tensor | None,
    mask: torch.Tensor | None,
    config: ComoeConfig,
) -> torch.Tensor:
    """The CoMoE loss [...] of z [..., T, n, r] (indices [..., T, k], gram [..., n*r, n*r], floor and mask
    [..., T]) on the fused Triton kernel (CUDA, comoe.objectives.triton_infonce): the anchors' dot products
    from the Gram matrices, then cosines and InfoNCE in one pass."""
    return fused_comoe_loss(*anchor_dots(z, indices, gram), indices, config.temperature, mask, floor)


def comoe_objective(record: LayerRecord, config: ComoeConfig) -> torch.Tensor:
    """CoMoE InfoNCE (arXiv 2505.17553, Algorithm 1): activated experts are each other's positives,
    inactive ones the negatives. Scalar: the mean over real tokens (and anchors); `comoe_batched` of the
    one record."""
    return comoe_batched([record], config)[0]


def moelora_objective(record: LayerRecord, config: ComoeConfig) -> torch.Tensor:
    """MoELoRA (arXiv 2402.12851; our reading): supervised contrastive loss over sampled (token, expert)
    outputs, labelled by expert. Scalar: the mean over items with a positive."""
    batched = moelora_batched([record], config)
    if batched is not None:
        return batched[0]
    indices = record.routing.indices
    tokens, token_valid = sample_contrastive_tokens(indices, record.mask, config.contrastive_max_tokens, None)
    item_tokens, experts, item_valid = contrastive_items(indices, tokens, token_valid)
    floor = None if record.norm_floor is None else record.norm_floor[item_tokens]
    cosines = output_item_cosines(record.outputs[item_tokens, experts], floor)
    return supcon_loss(cosines, experts, config.temperature, item_valid)


def moelora_batched(records: list[LayerRecord], config: ComoeConfig) -> torch.Tensor | None:
    """`moelora_objective` of every record of one group at once, [L] (Gram path): a fixed number of
    sampled tokens per layer (sample_contrastive_tokens), their items' cosines from the stacked Gram
    matrices. None (the per-layer path) for records that carry materialised outputs."""
    if records[0].outputs is not None:
        return None
    indices = stacked(records, lambda record: record.routing.indices)  # [L, T, k]
    z = stacked(records, lambda record: record.z)  # [L, T, n, r]
    tokens, token_valid = sample_contrastive_tokens(
        indices, stacked(records, lambda record: record.mask), config.contrastive_max_tokens, None
    )
    item_tokens, experts, item_valid = contrastive_items(indices, tokens, token_valid)  # [L, N]
    num_experts, r = z.shape[-2:]
    rows = (item_tokens * num_experts + experts).unsqueeze(-1).expand(*item_tokens.shape, r)
    z_items = z.flatten(-3, -2).gather(-2, rows)  # [L, N, r]
    floors = stacked_norm_floors(records)
    floor = None if floors is None else floors.gather(-1, item_tokens)
    cosines = item_cosines(z_items, experts, stacked_grams(records), floor)
    return supcon_loss(cosines, experts, config.temperature, item_valid)


COMOE = register_objective(
    Objective(
        "comoe",
        comoe_objective,
        component="contrastive",
        needs=CONTRASTIVE_NEEDS,
        batched_loss=comoe_batched,
        description="CoMoE InfoNCE among activated vs inactive experts (arXiv 2505.17553)",
    )
)
MOELORA = register_objective(
    Objective(
        "moelora",
        moelora_objective,
        component="contrastive",
        needs=CONTRASTIVE_NEEDS,
        batched_loss=moelora_batched,
        description="MoELoRA supervised contrastive loss by expert identity (arXiv 2402.12851)",
    )
)
