"""The training loss: cross-entropy on response tokens plus the weighted auxiliary losses, normalised over
the global batch so that N processes compute the gradient one process would."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from comoe.adapter.model import ComoeModel
from comoe.models.head import response_logits, unwrap_model
from comoe.training.distributed import SINGLE, World


def response_loss(
    model: nn.Module, batch: dict[str, torch.Tensor], world: World = SINGLE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy on response tokens, weighted auxiliary loss), both normalised over the global batch.

    Each process divides its sum by the number of tokens in all processes' micro-batches and multiplies by
    the world size, which DDP's gradient averaging divides back out: the gradients are those of one process
    holding the whole batch (per-token means of the task loss and of the per-token auxiliary losses).
    """
    inner = unwrap_model(model)
    comoe = inner if isinstance(inner, ComoeModel) else None
    with comoe.caller_adds_aux_loss() if comoe is not None else contextlib.nullcontext():
        logits, targets = response_logits(model, batch)
    aux = comoe.weighted_aux_loss if comoe is not None else torch.zeros(())
    if world.size == 1:
        return F.cross_entropy(logits, targets), aux
    task = F.cross_entropy(logits, targets, reduction="sum") * share(targets.numel(), world) / targets.numel()
    return task, aux * share(int(batch["attention_mask"].sum()), world)


def share(count: int, world: World) -> float:
    """count * world.size / (count summed over processes): the factor that turns a per-process mean into
    this process's part of the global mean, once DDP averages over processes."""
    return count * world.size / float(world.sum(torch.tensor(float(count)))) if world.size > 1 else 1.0


def aux_components(model: nn.Module) -> list[float]:
    """Balance and contrastive losses of the last forward (zeros for a PEFT model)."""
    inner = unwrap_model(model)
    if not isinstance(inner, ComoeModel):
        return [0.0, 0.0]
    losses = inner.last_aux_losses()
    return [losses["balance"], losses["contrastive"]]
