"""The training loss: cross-entropy on response tokens plus the weighted auxiliary losses, normalised over
the global batch so that N processes compute the gradient one process would."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from comoe.adapter.method import AdapterMethod, method_of
from comoe.models.head import response_logits, unwrap_model
from comoe.objectives.auxiliary import active_objectives
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
    method = adapter_method(inner)
    with method.caller_adds_aux_loss(inner):
        logits, targets = response_logits(model, batch)
    aux = method.weighted_aux_loss(inner)
    if world.size == 1:
        return F.cross_entropy(logits, targets), aux
    task = F.cross_entropy(logits, targets, reduction="sum") * share(targets.numel(), world) / targets.numel()
    return task, aux * share(int(batch["attention_mask"].sum()), world)


def share(count: int, world: World) -> float:
    """count * world.size / (count summed over processes): the factor that turns a per-process mean into
    this process's part of the global mean, once DDP averages over processes."""
    return count * world.size / float(world.sum(torch.tensor(float(count)))) if world.size > 1 else 1.0


def adapter_method(model: nn.Module) -> AdapterMethod:
    """The adapter method of a model being trained (unwrapped from DDP/FSDP); TypeError if it has none."""
    method = method_of(unwrap_model(model))
    if method is None:
        raise TypeError(f"{type(unwrap_model(model)).__name__} carries no comoe or PEFT LoRA adapter")
    return method


def shown_components(model: nn.Module) -> list[str]:
    """The loss components a run of `model` shows on its progress bar: 'task', then the component of each of
    its adapter's active objectives (weight > 0; e.g. contrastive for comoe, balance for mixlora, both for
    moelora, none for omoe, moelora-liu and the PEFT baselines). log.jsonl keeps every component
    aux_components reports (balance and contrastive always, 0 when off) for runs to compare column by
    column."""
    config = getattr(unwrap_model(model), "comoe_config", None)
    active = active_objectives(config).values() if config is not None else ()
    return ["task", *dict.fromkeys(objective.component for objective, _ in active)]


def aux_components(model: nn.Module) -> dict[str, float]:
    """The auxiliary loss components of the last forward, by name (balance and contrastive for comoe
    presets, and any other active objective's; none for a method without auxiliary losses)."""
    inner = unwrap_model(model)
    return adapter_method(inner).aux_components(inner)
