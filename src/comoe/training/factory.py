"""The model a training run fine-tunes: the base model plus a comoe preset, or a PEFT baseline (LoRA, DoRA)
matched to it."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from comoe.adapter.method import method_for
from comoe.adapter.model import config_call_inputs
from comoe.models.compile import compile_blocks
from comoe.models.device import resolve_device
from comoe.models.loading import load_base
from comoe.moe.banks import get_bank
from comoe.moe.experts import choose_strategy
from comoe.moe.routing import get_routing
from comoe.objectives.auxiliary import usable_objectives
from comoe.settings import locate, quantization_of
from comoe.training.settings import TrainArgs
from comoe.validation import InvalidSetting

logger = logging.getLogger(__name__)


def check_registered_names(args: TrainArgs) -> None:
    """Every registry-backed name of the run's adapter config is registered (after importing the plugins
    once): the routing kind (comoe.moe.routing), the expert bank (comoe.moe.banks), the mix strategy
    `expert_compute` (comoe.moe.experts) and the `aux_objectives` (comoe.objectives.registry; training
    needs every one, so an unregistered one is an error, not the inference loader's warning). The settings
    check the rest of the config without torch; these names need the registries, so the training entry
    checks them before any model loads. Raises InvalidSetting worded as the settings' other errors, naming
    the YAML file and field: `X.yaml: adapter_config: routing='topkk' is not a registered routing ...`."""
    config = args.comoe_config()
    try:
        get_routing(config.routing)
        get_bank(config.expert_bank)
        choose_strategy(config.expert_compute, config.num_experts, config.top_k)
        usable_objectives(config, strict=True)
    except ValueError as error:
        raise adapter_config_error(args, error) from None


def adapter_config_error(args: TrainArgs, error: ValueError) -> InvalidSetting:
    """An error of the run's adapter config found after the settings loaded, worded as their other errors
    (naming the YAML file: `X.yaml: adapter_config: ...`)."""
    return locate(args, InvalidSetting("adapter_config", f"adapter_config: {error}"))


def build_model(args: TrainArgs, tasks: list[str] | None = None) -> tuple[nn.Module, Any]:
    """Base model (in args.dtype, with gradient checkpointing if asked) plus the method's adapter: a comoe
    preset, or a PEFT baseline (LoRA, DoRA) matched to the comoe preset; on args.device. The adapter is
    initialised on the CPU (the seeded init does not depend on the device) and moved with the model. A
    quantized base (--load-in-4bit / --load-in-8bit) is loaded onto args.device, where bitsandbytes
    quantizes it, and the adapter is made beside it. An adapter that reads task ids (routing 'task', the
    loramoe objective) and names no `tasks` of its own gets `tasks` (the training examples' task names) as
    its task vocabulary."""
    check_registered_names(args)  # before the base model loads
    device = resolve_device(args.device)  # a missing GPU fails before the model is loaded
    torch.manual_seed(args.seed)
    quantization = quantization_of(args)
    config = args.comoe_config()
    if config.tasks is None and tasks and "task_ids" in config_call_inputs(config):
        try:  # validated again with the tasks (knowledge_tasks among them), before the base model loads
            config = dataclasses.replace(config, tasks=list(tasks))
        except ValueError as error:
            raise adapter_config_error(args, error) from None
    base, tokenizer = load_base(
        args.model, dtype=getattr(torch, args.dtype), quantization=quantization, device=device
    )
    model = method_for(args.preset).build(base, config, args.gradient_checkpointing)
    if args.compile:
        logger.info("compiling %d decoder blocks (torch.compile)", compile_blocks(model))
    return (model if quantization else model.to(device)), tokenizer
