"""Where a forward's auxiliary losses go: one explicit delivery mode per call, and what was delivered.

A ComoeModel computes its auxiliary losses (comoe.objectives) after the base model's forward; how they
reach the optimiser depends on who computes the task loss:

- INTO_LOSS: a forward with labels returns `output.loss = task + token_share * aux` (transformers
  Trainer, a plain training loop; the token share is adapter/aux_gradient.token_share);
- TO_CALLER: the caller computes the task loss and adds `weighted_aux_loss` itself
  (inside `caller_adds_aux_loss()`: comoe's own training loop, with its own normalisation);
- CARRIED: the caller computes the task loss from the outputs without telling the model (TRL's fused LM
  head calls the backbone directly; label smoothing): the gradient of `aux_gradient_scale * aux` rides on
  the backbone's output (adapter/aux_gradient.py);
- REPORTED: an evaluation forward with labels computes them for `last_aux_losses()` but leaves
  `output.loss` the task loss, so an evaluation loss (Trainer's `eval_loss`) is the quantity comoe's own
  validation loss is;
- NONE: no auxiliary losses (evaluation without labels, adapters disabled).

`choose_delivery` decides the mode from the call; `LossDelivery` applies it and keeps what each mode
leaves for the trainer (the last components, the weighted loss, the running sums a trainer reports).
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator
from typing import Any

import torch

from comoe.adapter.aux_gradient import carry_aux_gradient
from comoe.objectives.auxiliary import ALWAYS_REPORTED, AuxiliaryLosses


class Delivery(enum.Enum):
    NONE = "none"
    INTO_LOSS = "into_loss"
    REPORTED = "reported"
    TO_CALLER = "to_caller"
    CARRIED = "carried"


def choose_delivery(
    *,
    wants_aux: bool,
    has_labels: bool,
    caller_adds: bool,
    can_carry: bool,
    direct: bool = False,
    training: bool = True,
) -> Delivery:
    """The mode of one call. `wants_aux`: adapters on and (training or labels given); `caller_adds`: inside
    caller_adds_aux_loss(); `can_carry`: the model has a backbone whose output can carry a gradient;
    `direct`: the backbone was called without the model's forward (then labels never reach the model);
    `training`: the model is in training mode."""
    if not wants_aux:
        return Delivery.NONE
    if has_labels and not direct:
        return Delivery.INTO_LOSS if training else Delivery.REPORTED
    if caller_adds or not can_carry:
        return Delivery.TO_CALLER
    return Delivery.CARRIED


class LossDelivery:
    """Applies a call's delivery mode to its auxiliary losses and keeps what each mode leaves behind."""

    def __init__(self) -> None:
        self.caller_adds = False
        # The weight of the auxiliary gradient carried by the backbone's output: 1 for one micro-batch per
        # optimizer step, 1/N for N accumulated ones (ComoeTrainerMixin sets it).
        self.aux_gradient_scale = 1.0
        self.last = AuxiliaryLosses()
        self.last_task: torch.Tensor | None = None
        self._carried: torch.Tensor | None = None
        self._in_loss: torch.Tensor | None = None

    @contextlib.contextmanager
    def caller_adding(self) -> Iterator[None]:
        """Inside this block, forwards without labels deliver TO_CALLER."""
        previous, self.caller_adds = self.caller_adds, True
        try:
            yield
        finally:
            self.caller_adds = previous

    def keep(self, losses: AuxiliaryLosses) -> None:
        """Record a call's auxiliary losses as the last ones (a task loss comes with INTO_LOSS)."""
        self.last, self.last_task = losses, None

    def into_loss(self, output: Any, share: float | torch.Tensor) -> None:
        """INTO_LOSS: output.loss += share * the weighted auxiliary loss (when the output has a loss)."""
        task = getattr(output, "loss", None)
        if task is None:
            return
        self.last_task = task.detach()
        aux = self.last.total * share
        output.loss = task + aux
        self._in_loss = _plus(self._in_loss, aux.detach())

    def carry(self, output: Any) -> Any:
        """CARRIED: the backbone's output, its last hidden state carrying the weighted auxiliary gradient."""
        hidden, scale, aux = output[0], self.aux_gradient_scale, self.last.total
        carried = carry_aux_gradient(hidden, aux, scale)
        if carried is hidden:  # no gradient is being recorded
            return output
        self._carried = _plus(self._carried, aux.detach() * scale)
        if isinstance(output, tuple):
            return (carried, *output[1:])
        output.last_hidden_state = carried
        return output

    def take_carried(self) -> torch.Tensor | None:
        """The carried weighted auxiliary loss (times its scale, detached) since the last call; cleared."""
        carried, self._carried = self._carried, None
        return carried

    def take_in_loss(self) -> torch.Tensor | None:
        """The weighted auxiliary loss added to `output.loss` (times its share, detached) since the last
        call; cleared."""
        added, self._in_loss = self._in_loss, None
        return added

    def components(self) -> dict[str, float]:
        """The last forward's loss components: task (0 when the caller computed it), balance, contrastive
        (0 when off) and any other active objective's component."""
        values = {name: float(value.detach()) for name, value in self.last.values.items()}
        task = float(self.last_task) if self.last_task is not None else 0.0
        return {"task": task, **dict.fromkeys(ALWAYS_REPORTED, 0.0), **values}


def _plus(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """A running sum that starts empty (None)."""
    return value if total is None else total + value
