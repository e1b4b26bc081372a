"""The auxiliary losses of a forward, computed from what each layer left in `layer.step`.

Contrastive objectives only need cosines between expert outputs e_i = s * B_i A_i x. With z_i = A_i x
(already computed for every expert by the layer) and the Gram blocks G_ij = B_i B_j^T (r x r, once per
step and independent of tokens), e_i . e_j = s^2 z_i^T G_ij z_j exactly, at O(n^2 r^2) per token instead
of materialising n outputs of size d_out. The InfoNCE tails are the reference ones in comoe.losses.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from comoe.config import ComoeConfig
from comoe.experts import expert_gram
from comoe.layer import ComoeLinear, LayerStep
from comoe.losses import (
    NORMALIZE_EPS,
    comoe_loss_from_anchor_cosines,
    load_balance_loss,
    sample_contrastive_tokens,
    supcon_loss,
)


def cosines_from_dots(dots: torch.Tensor) -> torch.Tensor:
    """Cosines from a matrix of dot products, normalising as F.normalize does: x / max(|x|, eps)."""
    norms = dots.diagonal(dim1=-2, dim2=-1).clamp_min(NORMALIZE_EPS**2).sqrt()
    return dots / (norms.unsqueeze(-1) * norms.unsqueeze(-2))


def anchor_cosines(z: torch.Tensor, indices: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """[T, k, n] cosines between each token's active experts (rows) and all n experts (columns).

    Only the k anchor rows of each token's n x n cosine matrix are needed. The anchor's z is placed in
    its expert's r-block of an n*r vector (zeros elsewhere), so all k rows of dot products come from one
    dense [T*k, n*r] x [n*r, n*r] matmul with the Gram matrix and an r-wide reduction: no sort, gather
    or scatter, which cost more than the extra FLOPs on the zero blocks.
    """
    num_tokens, n, r = z.shape
    k = indices.shape[1]
    z = z.float()
    anchor_blocks = torch.nn.functional.one_hot(indices, n).to(z.dtype).unsqueeze(-1)  # [T, k, n, 1]
    placed = (anchor_blocks * z.unsqueeze(1)).view(num_tokens * k, n * r)
    dots = ((placed @ gram).view(num_tokens, k, n, r) * z.unsqueeze(1)).sum(-1)  # [T, k, n]
    norms = _block_self_dots(z, gram).clamp_min(NORMALIZE_EPS**2).sqrt()  # [T, n]
    anchor_norms = norms.gather(1, indices)  # [T, k]
    return dots / (anchor_norms.unsqueeze(-1) * norms.unsqueeze(1))


def _block_self_dots(z: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """|e_j|^2 / s^2 = z_j G_jj z_j for every token and expert: one batched matmul over experts."""
    num_tokens, n, r = z.shape
    diagonal = gram.view(n, r, n, r).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [n, r, r]: G_jj
    zt = z.transpose(0, 1)  # [n, T, r]
    return (torch.bmm(zt, diagonal) * zt).sum(-1).t()


def item_cosines(z_items: torch.Tensor, experts: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """[N, N] cosines between N (token, expert) outputs given their z rows [N, r] and expert ids [N].

    Each item is placed in its expert's block of an n*r vector, so all dot products are Zhat G Zhat^T.
    """
    n = gram.shape[0] // z_items.shape[1]
    placed = torch.nn.functional.one_hot(experts, n).to(torch.float32).unsqueeze(
        -1
    ) * z_items.float().unsqueeze(1)
    placed = placed.reshape(z_items.shape[0], -1)
    return cosines_from_dots(placed @ gram @ placed.t())


def contrastive_loss(layer: ComoeLinear, step: LayerStep, config: ComoeConfig) -> torch.Tensor:
    gram = step.gram if step.gram is not None else expert_gram(layer.lora_B)
    indices = step.routing.indices
    if config.contrastive == "comoe":
        rows = anchor_cosines(step.z, indices, gram)
        return comoe_loss_from_anchor_cosines(
            rows, indices, config.temperature, config.anchor, step.mask, num_negatives=config.num_negatives
        )
    tokens, topk = sample_contrastive_tokens(indices, step.mask, config.contrastive_max_tokens, None)
    experts = topk.flatten()
    z_items = step.z[tokens.repeat_interleave(topk.shape[1]), experts]
    return supcon_loss(item_cosines(z_items, experts, gram), experts, config.temperature)


def global_expert_fraction(step: LayerStep) -> torch.Tensor | None:
    """f_i of the balance loss counted over every process's tokens (None with one process).

    Only the counts are shared: the gradient flows through each process's own mean probabilities, and the
    trainer's per-token weighting of the auxiliary loss then gives exactly the one-process gradient.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    indices = step.routing.indices if step.mask is None else step.routing.indices[step.mask]
    counts = torch.bincount(indices.reshape(-1), minlength=step.routing.num_experts).double()
    dist.all_reduce(counts)
    return (counts / counts.sum().clamp_min(1)).to(step.routing.probs.dtype)


def auxiliary_losses(layers: list[ComoeLinear], config: ComoeConfig) -> dict[str, torch.Tensor]:
    """Balance and contrastive losses, each the mean over adapted layers (zero when turned off)."""
    balance, contrastive = [], []
    for layer in layers:
        step = layer.step
        if config.balance_weight > 0:
            fraction = global_expert_fraction(step) if config.balance_scope == "global" else None
            balance.append(load_balance_loss(step.routing.probs, step.routing.indices, step.mask, fraction))
        if config.contrastive != "none" and config.contrastive_weight > 0:
            contrastive.append(contrastive_loss(layer, step, config))
    zero = torch.zeros((), device=layers[0].lora_A.device) if layers else torch.zeros(())
    return {
        "balance": torch.stack(balance).mean() if balance else zero,
        "contrastive": torch.stack(contrastive).mean() if contrastive else zero,
    }
