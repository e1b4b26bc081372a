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
from comoe.settings import quantization_of
from comoe.training.registered import adapter_config_error, check_registered_names
from comoe.training.settings import TrainArgs

logger = logging.getLogger(__name__)


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
