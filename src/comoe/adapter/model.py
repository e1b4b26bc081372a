"""ComoeModel: a Hugging Face / PEFT-style facade over a model with mixtures of LoRA experts injected.

The concepts live beside it: injection (which modules become ComoeLinear layers, the adapter's tensor
names and shapes: adapter/injection.py), loss delivery (where a forward's auxiliary losses go, one mode per
call: adapter/delivery.py), token masks per token stream (adapter/streams.py) and the folder format
(adapter/folder.py, adapter/serialization.py). This class wires them to transformers' and PEFT's names. A
small injector of our own rather than PEFT's BaseTuner: see docs/design.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from comoe.adapter.aux_gradient import token_share
from comoe.adapter.delivery import Delivery, LossDelivery, choose_delivery
from comoe.adapter.hf_compat import (
    UNSUPPORTED,
    CheckpointingMixin,
    ForwardWithWrappedSignature,
    UnsupportedOperation,
)
from comoe.adapter.injection import adapter_tensors, eject, inject
from comoe.adapter.layer import ComoeContext, ComoeLinear
from comoe.adapter.persistence import AdapterPersistenceMixin
from comoe.adapter.streams import TokenMasks, bound_arguments, is_encoder_decoder, prompt_inputs
from comoe.config import ComoeConfig
from comoe.moe.prompt import PROMPT_INPUTS
from comoe.moe.record import LayerRecord
from comoe.moe.routing import check_task_ids, get_routing
from comoe.objectives.auxiliary import (
    AuxiliaryLosses,
    compute_auxiliary_losses,
    requirements,
    usable_objectives,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ForwardCall:
    """One call's delivery mode and token masks; `direct`: the backbone was called without our forward."""

    mode: Delivery
    masks: TokenMasks
    direct: bool = False


class ComoeModel(AdapterPersistenceMixin, CheckpointingMixin, nn.Module):
    """A base model whose targeted linears are mixtures of LoRA experts; everything else is frozen.

    Names follow transformers and PEFT: `wrapped_model` (also `get_base_model()`) is the model that was
    adapted, e.g. a LlamaForCausalLM; `base_model` is its backbone (LlamaModel), as `model.base_model` is
    on any transformers model. Other attributes reach the wrapped model.
    """

    def __init__(self, model: nn.Module, config: ComoeConfig, strict_objectives: bool = True) -> None:
        """`strict_objectives=False` (an adapter loaded for inference): objectives of `aux_objectives` that
        no module registered in this process are left out with a warning instead of refused."""
        super().__init__()
        self._context = ComoeContext()
        injection = inject(model, usable_objectives(config, strict_objectives), self._context)
        self.wrapped_model = model
        # what was configured (and is saved); the losses use the objectives this process has
        self.comoe_config = dataclasses.replace(injection.config, aux_objectives=dict(config.aux_objectives))
        self._loss_config = injection.config
        self.delivery = LossDelivery()
        self._call: ForwardCall | None = None  # set for the duration of one forward
        self._recorded: dict[str, LayerRecord] | None = None  # inside record_routing()
        # Free-form lines for the model card (training data, evaluation results), set by whoever knows them.
        self.card_notes: dict[str, str] = {}
        self.__dict__["_injection"] = injection  # a plain attribute: the layers are registered inside model
        self._encoder_decoder = is_encoder_decoder(model)
        self._has_objectives = bool(self._loss_config.objective_weights)  # else no record is needed
        # per-call inputs (ComoeContext.call_inputs) the routing kinds and objectives read; none for most
        self._task_ids_in_records = "task_ids" in requirements(self._loss_config)
        kinds = {getattr(layer, "routing_kind", None) for layer in injection.layers.values()}
        self._routing_inputs: frozenset[str] = frozenset().union(*(k.inputs for k in kinds if k is not None))
        self.call_input_names = self._routing_inputs | ({"task_ids"} if self._task_ids_in_records else set())
        self._default_inputs: dict[str, torch.Tensor] = {}  # inside default_call_inputs()
        self._generating = False  # inside generate()
        # routing kinds that read the call's prompt (MiLoRA's): the model binds it from each call
        self.reads_prompt = any(kind is not None and kind.reads_prompt for kind in kinds)
        backbone = self.base_model
        self._can_carry = backbone is not model
        self._hooks: list[RemovableHandle] = []  # removed by unload(): the base goes back without them
        if self._can_carry:  # called directly by some trainers (TRL's fused LM head): see _backbone_*
            self._hooks.append(backbone.register_forward_pre_hook(self._backbone_pre_hook, with_kwargs=True))
            self._hooks.append(backbone.register_forward_hook(self._backbone_hook))

    @property
    def base_model(self) -> nn.Module:
        """The wrapped model's backbone (transformers' `base_model`), or the wrapped model itself."""
        return getattr(self.wrapped_model, "base_model", self.wrapped_model)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (PEFT's name for it)."""
        return self.wrapped_model

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "wrapped_model":
                raise
            if name in UNSUPPORTED:
                raise UnsupportedOperation(f"ComoeModel.{name}: not supported: {UNSUPPORTED[name]}") from None
            return getattr(self.wrapped_model, name)

    def comoe_layers(self) -> dict[str, ComoeLinear]:
        return dict(self._injection.layers)

    # ---- forward and the auxiliary losses' delivery (adapter/delivery.py) --------------------------------
    forward = ForwardWithWrappedSignature()

    def _class_forward(
        self, input_ids: Any = None, attention_mask: Any = None, labels: Any = None, **kwargs: Any
    ) -> Any:
        return self._forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward; with labels (or in training) the auxiliary losses are computed and
        delivered as the call's mode says (adapter/delivery.py): into `output.loss` with labels in training
        (reported only, in evaluation); in training without labels, to the caller inside
        `caller_adds_aux_loss()`, else carried by the backbone's output. The per-call inputs the adapter
        reads (`call_input_names`, e.g. task_ids) are taken out of the call before the base model sees it."""
        arguments = bound_arguments(self.wrapped_model.forward, args, kwargs)
        has_labels = arguments.get("labels") is not None
        self._take_call_inputs(kwargs, losses=self.training or has_labels, batch=call_batch(arguments))
        if self.reads_prompt:
            self._bind_prompt(arguments, kwargs.pop("prompt_mask", None))
        mode = choose_delivery(
            wants_aux=self._context.adapters_enabled and (self.training or has_labels),
            has_labels=has_labels,
            caller_adds=self.delivery.caller_adds,
            can_carry=self._can_carry,
            training=self.training,
        )
        self._begin(ForwardCall(mode, TokenMasks.bind(arguments, self._encoder_decoder)))
        try:
            output = self.wrapped_model(*args, **kwargs)
            if mode in (Delivery.INTO_LOSS, Delivery.TO_CALLER, Delivery.REPORTED):
                self.delivery.keep(self._auxiliary_losses())
            if mode is Delivery.INTO_LOSS:
                self.delivery.into_loss(output, token_share(arguments))
            elif mode is Delivery.REPORTED and getattr(output, "loss", None) is not None:
                self.delivery.last_task = output.loss.detach()
        finally:
            self._end_forward()
        return output

    def _take_call_inputs(self, kwargs: dict[str, Any], losses: bool, batch: int | None = None) -> None:
        """Move this model's per-call inputs from a call's keyword arguments into the layers' context (the
        defaults of `default_call_inputs` for those the call does not give); ValueError for a missing one
        while the adapters are on: one the routing reads, or (`losses`: a call that computes the auxiliary
        losses) one an objective reads; and for task_ids that are not [batch] or [1] integer ids of this
        adapter's tasks (or -1), `batch` being the call's number of sequences (None: not known). A model
        without per-call inputs leaves the call as it is."""
        inputs: dict[str, torch.Tensor] = {}
        required = self.call_input_names if losses else self._routing_inputs
        for name in self.call_input_names:
            value = kwargs.pop(name, None)
            value = self._default_inputs.get(name) if value is None else value
            if value is None:
                if self._context.adapters_enabled and name in required:
                    raise ValueError(
                        f"{name}: missing; this adapter (routing={self.comoe_config.routing!r}, objectives "
                        f"{sorted(self.comoe_config.objective_weights)}) reads each sequence's {name} [B] "
                        "int64 (ids into comoe_config.tasks, -1 for a task outside them): pass it as a "
                        "keyword of the call, or set it with default_call_inputs()"
                    )
                continue
            inputs[name] = value
        if inputs:  # once per call, not once per layer: on the adapter's device
            device = next(self.parameters()).device
            inputs = {k: self._call_input(k, v, batch).to(device) for k, v in inputs.items()}
        self._context.call_inputs = inputs

    def _call_input(self, name: str, value: Any, batch: int | None) -> torch.Tensor:
        """One per-call input as a flat int64 tensor; task_ids checked (moe.routing.check_task_ids)."""
        if name == "task_ids":
            return check_task_ids(value, len(self.comoe_config.tasks or []), batch)
        return torch.as_tensor(value, dtype=torch.long).reshape(-1)

    def _bind_prompt(self, arguments: dict[str, Any], prompt: torch.Tensor | None = None) -> None:
        """The call's prompt tokens (or that it continues a KV cache) into the layers' context, for routing
        kinds that read it (streams.prompt_inputs; `prompt` [B, L]: a caller's own prompt_mask keyword,
        e.g. comoe's training loop, which passes no labels)."""
        inputs = self._context.call_inputs
        for key in PROMPT_INPUTS:
            inputs.pop(key, None)
        inputs.update(prompt_inputs(arguments, prompt))

    @contextlib.contextmanager
    def default_call_inputs(self, **inputs: Any) -> Iterator[None]:
        """Inside this block, calls (forward and generate) that do not pass a per-call input get these:
        e.g. `default_call_inputs(task_ids=[3])` runs every sequence as task 3 (a [1] tensor is spread over
        every row), which is how evaluation scores one task's examples through code that does not know of
        task ids. Names outside `call_input_names` are refused (ValueError)."""
        unknown = set(inputs) - self.call_input_names
        if unknown:
            raise ValueError(
                f"default_call_inputs: {sorted(unknown)} are not inputs of this adapter; valid: "
                f"{sorted(self.call_input_names)}"
            )
        previous = self._default_inputs
        self._default_inputs = {**previous, **inputs}
        try:
            yield
        finally:
            self._default_inputs = previous

    def unset_routing_inputs(self) -> list[str]:
        """The per-call inputs this adapter's routing reads (e.g. 'task_ids' for routing 'task') that no
        enclosing default_call_inputs block sets: a call must pass them itself, or it is refused."""
        return sorted(self._routing_inputs - set(self._default_inputs))

    def _backbone_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The backbone called directly, outside this model's forward (TRL's fused LM head runs the backbone
        and the head itself): in training, keep the records the auxiliary losses need. Each such call
        (generate's steps too) binds its prompt for the routing kinds that read it."""
        if self._call is None and self._routing_inputs and not self._generating:
            batch = call_batch(bound_arguments(module.forward, args, kwargs))
            self._take_call_inputs({}, losses=False, batch=batch)  # a direct call: no stale ids
        if self._call is None and self.reads_prompt:
            self._bind_prompt(bound_arguments(module.forward, args, kwargs))
        if self._call is not None or not (self.training and self._context.adapters_enabled):
            return
        adds = self.delivery.caller_adds
        mode = choose_delivery(
            wants_aux=True, has_labels=False, caller_adds=adds, can_carry=True, direct=True
        )
        masks = TokenMasks.bind(bound_arguments(module.forward, args, kwargs), self._encoder_decoder)
        self._begin(ForwardCall(mode, masks, direct=True))

    def _backbone_hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        """Where the caller computes the task loss from the backbone's output (a direct backbone call, or a
        training forward without labels): compute the auxiliary losses, and carry their gradient on the
        output in CARRIED mode, so that any trainer's backward includes them."""
        call = self._call
        if call is None or not (call.direct or call.mode is Delivery.CARRIED):
            return None
        try:
            self.delivery.keep(self._auxiliary_losses())
            if call.mode is Delivery.CARRIED:
                output = self.delivery.carry(output)
        finally:
            if call.direct:
                self._end_forward()
        return output

    def _begin(self, call: ForwardCall) -> None:
        self._call = call
        wanted = call.mode is not Delivery.NONE and self._has_objectives
        self._context.keep_records = wanted or self._recorded is not None

    def _records(self) -> dict[str, LayerRecord]:
        """This forward's layer records, each with its token stream's mask."""
        assert self._call is not None
        masks = self._call.masks
        task_ids = self._context.call_inputs.get("task_ids") if self._task_ids_in_records else None
        return {
            name: dataclasses.replace(
                layer.record,
                mask=masks.for_layer(layer.stream, layer.record.z.shape[0], name),
                task_ids=task_ids,
            )
            for name, layer in self._injection.layers.items()
            if layer.record is not None
        }

    def _auxiliary_losses(self) -> AuxiliaryLosses:
        return compute_auxiliary_losses(list(self._records().values()), self._loss_config)

    def _end_forward(self) -> None:
        """Drop the per-layer tensors of this forward (or hand them to record_routing)."""
        try:
            if self._recorded is not None:
                self._recorded.clear()
                self._recorded.update(self._records())
        finally:
            self._call = None
            self._context.keep_records = False
            for layer in self._injection.layers.values():
                layer.record = None

    @property
    def aux_gradient_scale(self) -> float:
        """The weight of the auxiliary gradient carried by the backbone's output: 1 for one micro-batch per
        optimizer step, 1/N for N accumulated ones (ComoeTrainerMixin sets it)."""
        return self.delivery.aux_gradient_scale

    @aux_gradient_scale.setter
    def aux_gradient_scale(self, value: float) -> None:
        self.delivery.aux_gradient_scale = value

    @property
    def weighted_aux_parts(self) -> dict[str, torch.Tensor]:
        """Each weighted auxiliary loss of the last forward with auxiliary losses, by component."""
        return self.delivery.last.weighted

    @property
    def weighted_aux_loss(self) -> torch.Tensor:
        """The weighted auxiliary loss of the last forward with auxiliary losses (the sum of
        `weighted_aux_parts`), for callers that compute the task loss themselves."""
        return self.delivery.last.total

    def take_carried_aux_loss(self) -> torch.Tensor | None:
        """The weighted auxiliary loss (times aux_gradient_scale, detached) whose gradient the backbone's
        output carried since the last call, then cleared; None if none. For a trainer to report it in its
        loss (ComoeTrainerMixin does); the gradient is already in place."""
        return self.delivery.take_carried()

    def take_aux_in_loss(self) -> torch.Tensor | None:
        """The weighted auxiliary loss (times its token share, detached) that forwards with labels added to
        `output.loss` since the last call, then cleared; None if none."""
        return self.delivery.take_in_loss()

    def caller_adds_aux_loss(self) -> contextlib.AbstractContextManager[None]:
        """Inside this block a training forward without labels leaves the weighted auxiliary loss to the
        caller (`weighted_aux_loss`), which adds it to its own loss with its own normalisation over
        micro-batches and processes (comoe's training loop does), instead of carrying its gradient."""
        return self.delivery.caller_adding()

    def last_aux_losses(self) -> dict[str, float]:
        """The loss components of the last training forward: task, balance, contrastive (0 when off; task
        is 0 too when the caller computed the task loss itself, as TRL's fused head does), and the
        component of any other active objective."""
        return self.delivery.components()

    @contextlib.contextmanager
    def record_routing(self) -> Iterator[dict[str, LayerRecord]]:
        """Inside this block, keep each layer's last routing and down-projections for analysis.

        Yields a dict layer name -> LayerRecord (with its token mask), refreshed after every forward;
        outside the block nothing is kept, so no tensors stay alive across training steps.
        """
        self._recorded = {}
        try:
            yield self._recorded
        finally:
            self._recorded = None

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's generate; this adapter's per-call inputs (e.g. task_ids [B]) are taken out
        first (transformers refuses model keywords it does not know) and hold for every step."""
        prompt = {"input_ids": kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))}
        batch = call_batch({**prompt, "inputs_embeds": kwargs.get("inputs_embeds")})
        self._take_call_inputs(kwargs, losses=False, batch=batch)
        self._generating = True  # its steps call the backbone directly: the inputs hold for all of them
        try:
            return self.wrapped_model.generate(*args, **kwargs)
        finally:  # a prompt's routing decision holds for its generation only (RoutingKind.reset)
            self._generating = False
            for layer in self._injection.layers.values():
                kind = getattr(layer, "routing_kind", None)
                if kind is not None:
                    kind.reset(layer)

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
        """Put the original layers (and modules_to_save originals) back and remove this model's hooks from
        the backbone; return the base model as it was before wrapping (this ComoeModel is spent)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        return eject(self.wrapped_model, self._injection)

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
        return adapter_tensors(self._injection)


def call_batch(arguments: dict[str, Any]) -> int | None:
    """The number of sequences of a call (B of its input_ids [B, L] or inputs_embeds [B, L, d]); None when
    it has neither (or a 1-D input_ids)."""
    for name, dims in (("input_ids", 2), ("inputs_embeds", 3)):
        value = arguments.get(name)
        if isinstance(value, torch.Tensor) and value.dim() == dims:
            return value.shape[0]
    return None


def config_call_inputs(config: ComoeConfig) -> frozenset[str]:
    """The per-call inputs an adapter of `config` will read (ComoeModel.call_input_names, known before it
    is built): its routing kind's and, when an active objective needs them, "task_ids"."""
    extra = {"task_ids"} if "task_ids" in requirements(usable_objectives(config, strict=False)) else set()
    return get_routing(config.routing).inputs | extra


def task_model(model: nn.Module) -> ComoeModel:
    """The ComoeModel of `model` (itself, or inside a DDP wrapper)."""
    return getattr(model, "module", model)


def task_vocabulary(model: nn.Module) -> list[str] | None:
    """The task names whose positions are the task ids `model` (or the model inside a DDP wrapper) reads:
    its adapter's `tasks`; None for a model that reads no task ids (every method but the task-routed ones)."""
    model = task_model(model)
    if "task_ids" not in getattr(model, "call_input_names", ()):
        return None
    return list(model.comoe_config.tasks or [])


def require_task(model: nn.Module, remedy: str) -> None:
    """ValueError naming `task` when `model` (or the ComoeModel inside a DDP wrapper) routes by task
    (routing 'task': its calls need task ids) and no enclosing default_call_inputs block sets them, with
    `remedy`: how the calling entry point takes a task. Nothing for any other model."""
    inner = task_model(model)
    if not isinstance(inner, ComoeModel) or not inner._context.adapters_enabled:
        return
    if "task_ids" not in inner.unset_routing_inputs():
        return
    config = inner.comoe_config
    names = ", ".join(repr(name) for name in config.tasks or [])
    raise ValueError(
        f"task: missing; this adapter routes by task (routing={config.routing!r}, its tasks: {names}) and "
        f"no task is set for these calls: {remedy}"
    )


def get_comoe_model(model: nn.Module, config: ComoeConfig) -> ComoeModel:
    """Freeze `model` and turn the linears that `config` targets into mixtures of LoRA experts. A config
    whose contrastive objective can only be zero (ComoeConfig.zero_objective) is built, with a warning."""
    if config.zero_objective:
        logger.warning("%s", config.zero_objective)
    return ComoeModel(model, config)
