"""How the weighted auxiliary losses enter a trainer's objective when the trainer is not comoe's own.

With labels, the model's forward adds them to `output.loss`, weighted by `token_share` where the trainer
normalises its task loss over a whole optimizer step (transformers Trainer's `num_items_in_batch`).

Without labels, the caller computes the task loss from the outputs: TRL's SFTTrainer (and any trainer
with a fused or chunked LM head) calls the backbone and applies the head itself, Trainer with label
smoothing computes it from the logits. A loss that only the model's forward would have added is lost
there, so the auxiliary losses' gradient is carried by the backbone's hidden states instead: its output
is passed through an identity whose backward also sends `scale` as the gradient of the weighted
auxiliary loss (Megatron-LM does the same for its MoE load-balancing loss):

    d(total)/d(aux) = scale,   d(total)/d(hidden) = the caller's gradient, unchanged

so `total = task + scale * aux` is what is differentiated, whatever the caller does with its task loss
(token normalisation, multiplying by the number of processes). `scale` is 1 for one micro-batch per
optimizer step and 1/N when N micro-batches are accumulated: the mean over micro-batches, which DDP's
gradient averaging turns into the mean over processes (TRL weights its own MoE auxiliary loss this way).
"""

from __future__ import annotations

from typing import Any

import torch


class _CarryAuxGradient(torch.autograd.Function):
    """hidden -> hidden; in backward, `scale` is the gradient of the auxiliary loss."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        shape, dtype, device = ctx.aux_meta
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


def carry_aux_gradient(hidden: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
    """`hidden`, unchanged in value, whose backward also backpropagates `scale * aux`. Returns `hidden`
    itself when there is nothing to carry (no gradient recorded, or an auxiliary loss without one)."""
    if not (torch.is_grad_enabled() and aux.requires_grad and hidden.requires_grad):
        return hidden
    return _CarryAuxGradient.apply(hidden, aux, scale)


IGNORE_INDEX = -100  # transformers' label for positions without a loss


def token_share(kwargs: dict[str, Any]) -> float | torch.Tensor:
    """The weight of one micro-batch's auxiliary loss in a loss normalised like its task loss.

    Given `num_items_in_batch` (transformers Trainer's count of label tokens over every micro-batch of the
    optimizer step, and over every process when it averages tokens across devices), the model's task loss
    is this micro-batch's token sum divided by that count, and Trainer neither divides by the number of
    accumulated micro-batches nor leaves the process count to DDP. The auxiliary loss, a per-micro-batch
    mean, is weighted by this micro-batch's share of the labelled tokens: summed over micro-batches and
    processes it is then a token-weighted mean, as the task loss is, rather than N times too large.
    Without the count the caller scales the whole loss itself: 1.
    """
    total = kwargs.get("num_items_in_batch")
    labels = kwargs.get("shift_labels")
    if labels is None:
        labels = kwargs.get("labels")
        if labels is not None and labels.dim() > 1:  # causal LM labels: position 0 predicts nothing
            labels = labels[..., 1:]
    if total is None or labels is None:
        return 1.0
    total = torch.as_tensor(total, device=labels.device).clamp(min=1)
    return (labels != IGNORE_INDEX).sum() / total
