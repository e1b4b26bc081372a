"""transformers Trainer (and trainers built on it, such as TRL's SFTTrainer) with a comoe adapter.

A plain `Trainer(model=<ComoeModel>)` already trains with default arguments: the model's forward carries
the wrapped model's signature (so no dataset column is dropped) and its loss includes the weighted
auxiliary losses, weighted per micro-batch as Trainer weights the task loss (adapter/aux_gradient.py).
What Trainer cannot know is that the model is an adapter: it chooses its checkpoint format with
`isinstance(model, (PreTrainedModel, PeftModel))`, so it writes the whole model as checkpoints and
resumes by loading the whole state dict. `ComoeTrainerMixin` makes every checkpoint and
`save_model()` an adapter folder (the one `ComoeModel.from_pretrained` and `comoe eval --adapter` read),
resumes from such folders, and logs the loss components (task, balance, contrastive: means over the
optimizer steps since the last log) beside `loss`.

    from transformers import Trainer
    class ComoeTrainer(ComoeTrainerMixin, Trainer): ...     # provided below
    from comoe.integrations.trl import ComoeSFTTrainer     # TRL's SFTTrainer with the mixin
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn
from transformers import Trainer

from comoe.adapter.method import method_of
from comoe.adapter.model import ComoeModel
from comoe.adapter.serialization import WEIGHTS_NAME


class ComoeTrainerMixin:
    """Overrides of transformers.Trainer for a ComoeModel; any other model takes Trainer's own path."""

    def _comoe_model(self, model: nn.Module | None = None) -> ComoeModel | None:
        """The trained model when its adapter method routes (a comoe preset), else None."""
        if model is None:
            model = self.accelerator.unwrap_model(self.model)  # type: ignore[attr-defined]
        method = method_of(model)
        return model if method is not None and method.has_routing else None

    def _set_signature_columns_if_needed(self) -> None:
        """Trainer keeps the dataset columns the forward's signature names (remove_unused_columns); a
        ComoeModel also reads its per-call inputs (`call_input_names`, e.g. a `task_ids` column of int task
        ids into its `tasks`), which the wrapped forward's signature does not name."""
        super()._set_signature_columns_if_needed()  # type: ignore[misc]
        comoe = self._comoe_model()
        columns = self._signature_columns  # type: ignore[has-type]
        if comoe is not None and columns is not None:
            self._signature_columns = [*columns, *sorted(comoe.call_input_names - set(columns))]

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        comoe = self._comoe_model()
        if comoe is None:
            return super().compute_loss(model, inputs, *args, **kwargs)  # type: ignore[misc]
        default = self.args.gradient_accumulation_steps  # type: ignore[attr-defined]
        steps = max(int(getattr(self, "current_gradient_accumulation_steps", default)), 1)
        comoe.aux_gradient_scale = 1.0 / steps  # the carried auxiliary gradient: mean over micro-batches
        result = super().compute_loss(model, inputs, *args, **kwargs)  # type: ignore[misc]
        loss = result[0] if isinstance(result, tuple) else result
        carried, in_loss = comoe.take_carried_aux_loss(), comoe.take_aux_in_loss()
        if model.training:
            self._add_components(comoe, self._task_value(loss, in_loss, kwargs, steps))
        if carried is None:
            return result
        loss = loss + carried.to(loss.device)  # its gradient is in place; reported as the forward path does
        return (loss, *result[1:]) if isinstance(result, tuple) else loss

    def _task_value(self, loss: Any, in_loss: Any, kwargs: dict[str, Any], steps: int) -> float:
        """This micro-batch's task loss on the scale of a step's mean. With num_items_in_batch, Trainer's
        loss is the micro-batch's token sum over the step's (and, averaging across devices, every
        process's) token count, multiplied by the process count: undo both."""
        value = float(loss.detach())
        normalised = kwargs.get("num_items_in_batch") is not None
        if normalised and self.args.average_tokens_across_devices:  # type: ignore[attr-defined]
            value /= self.accelerator.num_processes  # type: ignore[attr-defined]
        if in_loss is not None:
            value -= float(in_loss)
        return value * steps if normalised else value

    def _add_components(self, comoe: ComoeModel, task: float) -> None:
        sums = self.__dict__.setdefault("_comoe_sums", {})
        losses = {**comoe.last_aux_losses(), "task": task}  # every active objective's component, by name
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + value
        self.__dict__["_comoe_count"] = self.__dict__.get("_comoe_count", 0) + 1

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        count = self.__dict__.pop("_comoe_count", 0)
        sums = self.__dict__.pop("_comoe_sums", None)
        if "loss" in logs and count and sums is not None:
            logs.update({name: value / count for name, value in sums.items()})
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        comoe = self._comoe_model()
        if comoe is None:
            return super()._save(output_dir, state_dict)  # type: ignore[misc]
        output_dir = output_dir or self.args.output_dir  # type: ignore[attr-defined]
        comoe.save_pretrained(output_dir, is_main_process=self.args.should_save)  # type: ignore[attr-defined]
        tokenizer = getattr(self, "processing_class", None)
        if self.args.should_save and tokenizer is not None:  # type: ignore[attr-defined]
            tokenizer.save_pretrained(output_dir)
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        comoe = self._comoe_model(model)
        weights = os.path.join(resume_from_checkpoint, WEIGHTS_NAME)
        if comoe is not None and os.path.isfile(weights):
            comoe.load_adapter_weights(weights)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]

    def _load_best_model(self) -> None:
        comoe = self._comoe_model()
        best = self.state.best_model_checkpoint  # type: ignore[attr-defined]
        if comoe is not None and best and os.path.isfile(os.path.join(best, WEIGHTS_NAME)):
            comoe.load_adapter_weights(os.path.join(best, WEIGHTS_NAME))
            return
        super()._load_best_model()  # type: ignore[misc]


class ComoeTrainer(ComoeTrainerMixin, Trainer):
    """transformers.Trainer whose checkpoints and save_model() are comoe adapter folders."""
