"""ComoeModel: injects ComoeLinear layers into any module with nn.Linear children, adds the auxiliary
losses to the task loss, and saves/loads the adapter as PEFT does (adapter_config.json +
adapter_model.safetensors). A small injector of our own rather than PEFT's BaseTuner: see docs/design.md.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import torch
from huggingface_hub import HfApi
from torch import nn

from comoe.adapter.aux_gradient import carry_aux_gradient, token_share
from comoe.adapter.card import write_model_card
from comoe.adapter.layer import ComoeContext, ComoeLinear, layer_features
from comoe.adapter.saved import TrainedCopy
from comoe.adapter.serialization import (
    WEIGHTS_NAME,
    check_fits,
    full_tensor,
    load_config,
    load_weights_into,
    save_config,
    save_weights,
    tensor_shapes,
)
from comoe.adapter.targeting import find_target_linears, matches, resolve_targets, set_submodule
from comoe.config import ComoeConfig
from comoe.moe.record import LayerRecord
from comoe.objectives.auxiliary import auxiliary_losses

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


class _ForwardWithWrappedSignature:
    """ComoeModel.forward: on an instance, a callable carrying the wrapped model's signature
    (inspect.signature follows __wrapped__), because transformers Trainer keeps only the dataset columns
    named in the model's forward signature; with a bare (*args, **kwargs) it would drop every column. On
    the class (where Trainer looks for label names), a causal LM's usual signature. Built per access:
    nothing bound is stored on the instance, so copies and pickles of the model stay independent."""

    def __get__(self, instance: ComoeModel | None, owner: type) -> Callable[..., Any]:
        if instance is None:
            return owner._class_forward
        call = functools.partial(owner._forward, instance)
        return functools.wraps(instance.wrapped_model.forward)(call)


class ComoeModel(nn.Module):
    """A base model whose targeted linears are mixtures of LoRA experts; everything else is frozen.

    Names follow transformers and PEFT: `wrapped_model` (also `get_base_model()`) is the model that was
    adapted, e.g. a LlamaForCausalLM; `base_model` is its backbone (LlamaModel), as `model.base_model` is
    on any transformers model. Other attributes reach the wrapped model.
    """

    def __init__(self, model: nn.Module, config: ComoeConfig) -> None:
        super().__init__()
        config = resolve_targets(model, config)
        targets = find_target_linears(model, config)
        saved = modules_to_save(model, config)
        self.wrapped_model = model
        self.comoe_config = config
        self._context = ComoeContext()
        self._last_aux: dict[str, torch.Tensor] = {}
        self._recorded: dict[str, LayerRecord] | None = None
        # Each weighted auxiliary loss of the last forward (weighted_aux_loss sums them).
        self.weighted_aux_parts: dict[str, torch.Tensor] = {}
        # Free-form lines for the model card (training data, evaluation results), set by whoever knows them.
        self.card_notes: dict[str, str] = {}
        for param in model.parameters():
            param.requires_grad_(False)
        layers = {name: ComoeLinear(linear, config, self._context) for name, linear in targets.items()}
        for name, layer in layers.items():
            set_submodule(model, name, layer)
        copies = {name: TrainedCopy(module, self._context) for name, module in saved.items()}
        for name, copy_ in copies.items():
            set_submodule(model, name, copy_)
        self.__dict__["_layers"] = layers  # a plain dict: the layers are registered once, inside the model
        self.__dict__["_saved"] = copies
        self._inside_forward = False
        self._aux_to_caller = False
        self._carry = False  # this call's auxiliary gradient rides on the backbone's output (_backbone_hook)
        self._direct_call = False  # the backbone was called without this model's forward
        self._carried_aux: torch.Tensor | None = None
        self._aux_in_loss: torch.Tensor | None = None
        # The weight of the auxiliary gradient carried by the backbone's output (adapter/aux_gradient.py):
        # 1 for one micro-batch per optimizer step, 1/N for N accumulated ones (ComoeTrainerMixin sets it).
        self.aux_gradient_scale = 1.0
        backbone = self.base_model
        if backbone is not model:  # called directly by some trainers (TRL's fused LM head): see _backbone_*
            backbone.register_forward_pre_hook(self._backbone_pre_hook, with_kwargs=True)
            backbone.register_forward_hook(self._backbone_hook)

    @property
    def base_model(self) -> nn.Module:
        """The wrapped model's backbone (transformers' `base_model`), or the wrapped model itself."""
        return getattr(self.wrapped_model, "base_model", self.wrapped_model)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (PEFT's name for it)."""
        return self.wrapped_model

    def _backbone_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The backbone called directly, outside this model's forward (TRL's fused LM head runs the backbone
        and the head itself): in training, keep the records the auxiliary losses need, and carry their
        gradient on the backbone's output unless the caller adds them itself."""
        if self._inside_forward or not (self.training and self._context.adapters_enabled):
            return
        self._set_token_mask(kwargs.get("attention_mask"))
        self._context.keep_records = True
        self._direct_call = True
        self._carry = not self._aux_to_caller

    def _backbone_hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        """When this call's task loss is computed by the caller from the backbone's output (a direct
        backbone call, or a training forward without labels): compute the weighted auxiliary losses and
        return the output whose last hidden state carries their gradient (aux_gradient.py), so that any
        trainer's backward includes them."""
        if not (self._carry or self._direct_call):
            return None
        try:
            self._compute_auxiliary_losses()
            if self._carry:
                output = self._carrying(output)
        finally:
            self._carry = False
            if self._direct_call:
                self._direct_call = False
                self._end_forward()
        return output

    def _carrying(self, output: Any) -> Any:
        """The backbone's output with its last hidden state carrying the weighted auxiliary gradient."""
        hidden, scale, aux = output[0], self.aux_gradient_scale, self.weighted_aux_loss
        carried = carry_aux_gradient(hidden, aux, scale)
        if carried is hidden:  # no gradient is being recorded
            return output
        self._carried_aux = _plus(self._carried_aux, aux.detach() * scale)
        if isinstance(output, tuple):
            return (carried, *output[1:])
        output.last_hidden_state = carried
        return output

    def _set_token_mask(self, mask: torch.Tensor | None) -> None:
        """Which tokens the auxiliary losses count (the attention mask, flattened; None: all)."""
        self._context.token_mask = mask.reshape(-1).bool() if mask is not None else None

    def take_carried_aux_loss(self) -> torch.Tensor | None:
        """The weighted auxiliary loss (times aux_gradient_scale, detached) whose gradient the backbone's
        output carried since the last call, then cleared; None if none. For a trainer to report it in its
        loss (ComoeTrainerMixin does); the gradient is already in place."""
        carried, self._carried_aux = self._carried_aux, None
        return carried

    def take_aux_in_loss(self) -> torch.Tensor | None:
        """The weighted auxiliary loss (times its token share, detached) that forwards with labels added to
        `output.loss` since the last call, then cleared; None if none. For a trainer that reports the
        task loss apart from it (ComoeTrainerMixin)."""
        added, self._aux_in_loss = self._aux_in_loss, None
        return added

    @contextlib.contextmanager
    def caller_adds_aux_loss(self) -> Iterator[None]:
        """Inside this block a training forward without labels leaves the weighted auxiliary loss to the
        caller (`weighted_aux_loss`), which adds it to its own loss with its own normalisation over
        micro-batches and processes (comoe's training loop does), instead of carrying its gradient."""
        previous = self._aux_to_caller
        self._aux_to_caller = True
        try:
            yield
        finally:
            self._aux_to_caller = previous

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "wrapped_model":
                raise
            if name in UNSUPPORTED:
                raise UnsupportedOperation(f"ComoeModel.{name}: not supported: {UNSUPPORTED[name]}") from None
            return getattr(self.wrapped_model, name)

    @property
    def weighted_aux_loss(self) -> torch.Tensor:
        """The weighted auxiliary loss of the last forward with auxiliary losses (the sum of
        `weighted_aux_parts`), for callers that compute the task loss themselves (the trainer runs the LM
        head on response tokens only)."""
        return sum(self.weighted_aux_parts.values(), torch.zeros(()))

    def comoe_layers(self) -> dict[str, ComoeLinear]:
        return dict(self._layers)

    # ---- forward and losses -------------------------------------------------------------------------
    forward = _ForwardWithWrappedSignature()

    def _class_forward(
        self, input_ids: Any = None, attention_mask: Any = None, labels: Any = None, **kwargs: Any
    ) -> Any:
        return self._forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward; with labels (or in training) the auxiliary losses are computed.

        Where they go: with labels, into `output.loss`; in training without labels (the caller computes
        the task loss from the outputs), into the gradient carried by the backbone's output, or to the
        caller inside `caller_adds_aux_loss()`.
        """
        labels = kwargs.get("labels")
        want_aux = self._context.adapters_enabled and (self.training or labels is not None)
        self._set_token_mask(kwargs.get("attention_mask"))
        self._context.keep_records = want_aux or self._recorded is not None
        # Carried only where a backbone hook exists; otherwise computed for the caller, as inside the block
        carry = want_aux and labels is None and not self._aux_to_caller
        carry = carry and self.base_model is not self.wrapped_model
        self._carry = carry
        self._inside_forward = True
        try:
            output = self.wrapped_model(*args, **kwargs)
            if want_aux and not carry:
                self._add_auxiliary_losses(output, kwargs)
        finally:
            self._inside_forward = False
            self._carry = False
            self._end_forward()
        return output

    def _add_auxiliary_losses(self, output: Any, kwargs: dict[str, Any]) -> None:
        self._compute_auxiliary_losses()
        task = getattr(output, "loss", None)
        if task is not None:
            self._last_aux["task"] = task.detach()
            aux = self.weighted_aux_loss * token_share(kwargs)
            output.loss = task + aux
            self._aux_in_loss = _plus(self._aux_in_loss, aux.detach())

    def _compute_auxiliary_losses(self) -> None:
        """weighted_aux_parts (and the unweighted values for logging) from this forward's layer records."""
        records = [layer.record for layer in self._layers.values() if layer.record is not None]
        aux = auxiliary_losses(records, self.comoe_config)
        config = self.comoe_config
        self.weighted_aux_parts = {
            "balance": config.balance_weight * aux["balance"],
            "contrastive": config.contrastive_weight * aux["contrastive"],
        }
        self._last_aux = {name: value.detach() for name, value in aux.items()}

    def _end_forward(self) -> None:
        """Drop the per-layer tensors of this forward (or hand them to record_routing)."""
        self._context.token_mask = None
        self._context.keep_records = False
        if self._recorded is not None:
            self._recorded.clear()
            self._recorded.update({n: m.record for n, m in self._layers.items() if m.record is not None})
        for layer in self._layers.values():
            layer.record = None

    def last_aux_losses(self) -> dict[str, float]:
        """The loss components of the last training forward: task, balance, contrastive (0 when off; task
        is 0 too when the caller computed the task loss itself, as TRL's fused head does)."""
        return {name: float(self._last_aux.get(name, 0.0)) for name in ("task", "balance", "contrastive")}

    @contextlib.contextmanager
    def record_routing(self) -> Iterator[dict[str, LayerRecord]]:
        """Inside this block, keep each layer's last routing and down-projections for analysis.

        Yields a dict layer name -> LayerRecord, refreshed after every forward; outside the block nothing
        is kept, so no tensors stay alive across training steps.
        """
        self._recorded = {}
        try:
            yield self._recorded
        finally:
            self._recorded = None

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapped_model.generate(*args, **kwargs)

    # ---- adapters on and off ------------------------------------------------------------------------
    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Inside this block the model computes exactly the base model's outputs."""
        previous = self._context.adapters_enabled
        self._context.adapters_enabled = False
        try:
            yield
        finally:
            self._context.adapters_enabled = previous

    disable_adapter = disable_adapters  # PEFT's PeftModel spells it in the singular

    def unload(self) -> nn.Module:
        """Put the original layers (and modules_to_save originals) back; return the untouched base model."""
        for name, layer in self.comoe_layers().items():
            set_submodule(self.wrapped_model, name, layer.base_layer)
        for name, copy_ in self._saved.items():
            set_submodule(self.wrapped_model, name, copy_.original_module)
        return self.wrapped_model

    def merge_and_unload(self) -> nn.Module:
        raise NotImplementedError(
            "merge_and_unload: a mixture of experts cannot be merged into the base weights, because which "
            "experts apply (and with what gate) depends on each token's input; a merged dense weight would "
            "apply one fixed combination to every token. Keep the adapter, or unload() for the base model."
        )

    # ---- parameters ---------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} "
            f"|| trainable%: {100 * trainable / total:.4f}"
        )

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Experts and routers (and the modules_to_save copies), keyed by module path."""
        state = {}
        for name, layer in self.comoe_layers().items():
            state[f"{name}.lora_A"] = layer.lora_A
            state[f"{name}.lora_B"] = layer.lora_B
            state[f"{name}.router.weight"] = layer.router.weight
        for name, copy_ in self._saved.items():
            for key, param in copy_.trained_module.named_parameters():
                state[f"{name}.trained_module.{key}"] = param
        return state

    # ---- gradient checkpointing ---------------------------------------------------------------------
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
        aux = self.comoe_config.contrastive != "none" or self.comoe_config.balance_weight > 0
        if kwargs["use_reentrant"] and aux:
            raise ValueError(
                "gradient checkpointing with use_reentrant=True runs the blocks without autograd, so the "
                "balance/contrastive losses would get no gradient; use use_reentrant=False (the default)"
            )
        enable = getattr(self.wrapped_model, "activation_checkpointing_enable", None)
        if enable is None:  # transformers before activation_checkpointing_enable
            self.wrapped_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers, offload=offload)

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any
    ) -> None:
        """transformers' older name of activation_checkpointing_enable (same checks)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    # ---- save and load ------------------------------------------------------------------------------
    def save_pretrained(
        self,
        directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        safe_serialization: bool = True,
        **ignored: Any,
    ) -> None:
        """Write the adapter folder: adapter_config.json (with the base model's name and comoe's version),
        adapter_model.safetensors (experts and routers only) and a README.md model card.

        Takes the keywords transformers passes: `state_dict` (a state dict of this whole model, as Trainer
        gathers it: the adapter's entries are taken from it), `safe_serialization` (only True: comoe
        writes safetensors, never pickles), and ignores the rest (`max_shard_size`, `push_to_hub`, ...: an
        adapter is a few MB in one file). Under FSDP every process must call this (sharded experts are
        gathered); only the one with is_main_process writes, as in PEFT.
        """
        if not safe_serialization:
            raise ValueError("save_pretrained(safe_serialization=False): comoe writes safetensors only")
        if state_dict is not None:
            state = {name: state_dict[f"wrapped_model.{name}"] for name in self.adapter_state_dict()}
        else:
            state = self.adapter_state_dict()
        state = {name: full_tensor(tensor) for name, tensor in state.items()}
        if not is_main_process:
            return
        os.makedirs(directory, exist_ok=True)
        save_weights(state, directory)
        save_config(self.comoe_config, directory, base_model_name_or_path=self.base_model_name_or_path)
        write_model_card(directory, self.comoe_config, self.base_model_name_or_path, self.card_notes)

    @property
    def base_model_name_or_path(self) -> str | None:
        """What the wrapped model was loaded from (its config's name_or_path), recorded in the adapter
        folder so that AutoComoeModelForCausalLM can load base and adapter from the folder alone."""
        config = getattr(self.wrapped_model, "config", None)
        return getattr(config, "_name_or_path", None) or None

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload comoe adapter",
        **ignored: Any,
    ) -> str:
        """Upload the adapter folder (never the base model) to a Hub model repository, creating it if
        needed; returns the commit URL."""
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            commit = api.upload_folder(
                repo_id=repo_id, folder_path=folder, commit_message=commit_message, repo_type="model"
            )
        return str(commit)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, directory: str | os.PathLike, is_trainable: bool = False
    ) -> ComoeModel:
        """Wrap `model` with the adapter saved in `directory` (safetensors only; nothing is unpickled).

        The file's tensor names and shapes are checked against the config and the model before any expert
        is allocated, so a wrong or hostile config (num_experts = 10**9) fails at once, not in an allocation.
        """
        config = load_config(directory)
        weights = os.path.join(directory, WEIGHTS_NAME)
        shapes = adapter_shapes(find_target_linears(model, config), config)
        shapes.update(saved_shapes(modules_to_save(model, config)))
        check_fits(shapes, tensor_shapes(weights), weights)
        comoe = cls(model, config)
        comoe.load_adapter_weights(weights)
        if not is_trainable:
            comoe.eval()
            for param in comoe.parameters():
                param.requires_grad_(False)
        return comoe

    def load_adapter_weights(self, path: str | os.PathLike) -> None:
        """Load experts and routers from a safetensors file that must fit this model exactly."""
        load_weights_into(self.adapter_state_dict(), path)


def _plus(total: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """A running sum that starts empty (None)."""
    return value if total is None else total + value


def adapter_shapes(targets: dict[str, nn.Module], config: ComoeConfig) -> dict[str, tuple[int, ...]]:
    """The names and shapes of the experts and routers for these target layers, without building anything."""
    n, r = config.num_experts, config.r
    shapes = {}
    for name, linear in targets.items():
        d_in, d_out = layer_features(linear)
        shapes[f"{name}.lora_A"] = (n, r, d_in)
        shapes[f"{name}.lora_B"] = (n, r, d_out)
        shapes[f"{name}.router.weight"] = (n, d_in)
    return shapes


def modules_to_save(model: nn.Module, config: ComoeConfig) -> dict[str, nn.Module]:
    """The modules config.modules_to_save names (outermost matches), an error naming any that match none."""
    if not config.modules_to_save:
        return {}
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        inside = any(name.startswith(outer + ".") for outer in found)
        if name and not inside and matches(name, config.modules_to_save):
            found[name] = module
    unmatched = [t for t in config.modules_to_save if not any(matches(n, [t]) for n in found)]
    if unmatched:
        raise ValueError(f"modules_to_save: {unmatched} match no module of this {type(model).__name__}")
    return found


def saved_shapes(saved: dict[str, nn.Module]) -> dict[str, tuple[int, ...]]:
    return {
        f"{name}.trained_module.{key}": tuple(param.shape)
        for name, module in saved.items()
        for key, param in module.named_parameters()
    }


def get_comoe_model(model: nn.Module, config: ComoeConfig) -> ComoeModel:
    """Freeze `model` and turn the linears that `config` targets into mixtures of LoRA experts."""
    return ComoeModel(model, config)
