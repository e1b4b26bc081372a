"""What makes a ComoeModel behave as transformers and PEFT expect: the forward's signature, the adapter
names it refuses (rather than handing them to the wrapped model), and gradient checkpointing."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

# Adapter management of PEFT / transformers that a ComoeModel (one adapter, always active) does not have.
# Without this list, __getattr__ would hand them to the wrapped transformers model, whose own PEFT
# integration then acts on a model it knows nothing about (misleading errors, or a save without experts).
UNSUPPORTED = {
    "add_adapter": "a ComoeModel holds one adapter; wrap another copy of the base model for a second",
    "set_adapter": "a ComoeModel holds one adapter, always active (disable_adapters() turns it off)",
    "delete_adapter": "a ComoeModel holds one adapter; unload() returns the base model without it",
    "load_adapter": "use ComoeModel.from_pretrained(base_model, folder) or load_adapter_weights(path)",
    "active_adapters": "a ComoeModel holds one adapter, always active",
    "active_adapter": "a ComoeModel holds one adapter, always active",
    "enable_adapters": "the adapter is on unless inside disable_adapters()",
    "get_adapter_state_dict": "use adapter_state_dict()",
    "add_weighted_adapter": "mixtures of experts cannot be combined linearly",
    "merge_adapter": "a mixture of experts cannot be merged into the base weights (see merge_and_unload)",
}


class UnsupportedOperation(AttributeError):
    """An adapter-management name of PEFT / transformers that comoe does not implement (an AttributeError,
    so hasattr() is False and libraries that probe for these names take their non-PEFT path)."""


class ForwardWithWrappedSignature:
    """ComoeModel.forward: on an instance, a callable carrying the wrapped model's signature
    (inspect.signature follows __wrapped__), because transformers Trainer keeps only the dataset columns
    named in the model's forward signature; with a bare (*args, **kwargs) it would drop every column. On
    the class (where Trainer looks for label names), a causal LM's usual signature. Built per access:
    nothing bound is stored on the instance, so copies and pickles of the model stay independent."""

    def __get__(self, instance: nn.Module | None, owner: type) -> Callable[..., Any]:
        if instance is None:
            return owner._class_forward
        call = functools.partial(owner._forward, instance)
        return functools.wraps(instance.wrapped_model.forward)(call)




class CheckpointingMixin:
    """transformers' gradient checkpointing switches for a model that wraps another (`wrapped_model`) and
    whose auxiliary objectives (`comoe_config.objective_weights`) need autograd inside the blocks."""

    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: dict | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """The wrapped model's gradient (activation) checkpointing, non-reentrant by default.

        The auxiliary losses are computed after the forward from tensors each layer produced inside the
        checkpointed blocks. Non-reentrant checkpointing keeps those in the autograd graph (and the layers
        save the same tensors when the blocks are recomputed), so the gradients equal those without
        checkpointing. Reentrant checkpointing runs the blocks without autograd: the auxiliary losses
        would silently get no gradient, so it is refused when they are on."""
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        aux = bool(self.comoe_config.objective_weights)  # type: ignore[attr-defined]
        if kwargs["use_reentrant"] and aux:
            raise ValueError(
                "gradient checkpointing with use_reentrant=True runs the blocks without autograd, so the "
                "balance/contrastive losses would get no gradient; use use_reentrant=False (the default)"
            )
        wrapped = self.wrapped_model  # type: ignore[attr-defined]
        enable = getattr(wrapped, "activation_checkpointing_enable", None)
        if enable is None:  # transformers before activation_checkpointing_enable
            wrapped.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers, offload=offload)

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any
    ) -> None:
        """transformers' older name of activation_checkpointing_enable (same checks)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)
