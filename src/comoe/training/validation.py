"""Validation loss during training: the task loss (cross-entropy on response tokens, no auxiliary losses,
dropout off) over the whole validation set, overall and per task, so runs and methods compare on it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from comoe.data.collate import IGNORE_INDEX, Tokenized, pad_batch
from comoe.models.head import response_logits


@torch.no_grad()
def validation_loss(
    model: nn.Module,
    items: list[Tokenized],
    task_ids: list[int],
    task_names: list[str],
    batch_size: int,
    pad_id: int,
    model_task_ids: list[int] | None = None,
) -> dict[str, float]:
    """{'val_loss': per-token mean over all validation responses, 'val_loss/<task>': the same per task}.
    `model_task_ids`: each item's task id in the adapter's task vocabulary (-1 outside it), for adapters
    that read task ids (None for the others).

    Every process computes all of it (a few batches), so under DDP/FSDP all take part in each forward."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(task_names), dtype=torch.float64)
    counts = torch.zeros(len(task_names), dtype=torch.float64)
    device = next(model.parameters()).device
    try:
        for start in range(0, len(items), batch_size):
            chunk = list(range(start, min(start + batch_size, len(items))))
            batch = pad_batch([items[i] for i in chunk], pad_id)
            if model_task_ids is not None:
                batch["task_ids"] = torch.tensor([model_task_ids[i] for i in chunk])
            logits, targets = response_logits(model, {k: v.to(device) for k, v in batch.items()})
            rows = (batch["labels"][:, 1:] != IGNORE_INDEX).nonzero()[:, 0]
            tasks = torch.tensor([task_ids[i] for i in chunk])[rows]
            losses = F.cross_entropy(logits, targets, reduction="none").double().cpu()
            sums.index_add_(0, tasks, losses)
            counts.index_add_(0, tasks, torch.ones_like(losses))
    finally:
        model.train(was_training)
    result = {"val_loss": float(sums.sum() / counts.sum().clamp_min(1))}
    for index, name in enumerate(task_names):
        if counts[index] > 0:
            result[f"val_loss/{name}"] = float(sums[index] / counts[index])
    return result
