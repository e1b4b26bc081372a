"""Greedy generation for evaluation: batched with left padding, KV cache on."""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from comoe.adapter.model import require_task, task_model
from comoe.data.collate import prompt_ids
from comoe.data.example import Example
from comoe.data.prompts import render_prompt
from comoe.evaluation.loglik import context_length
from comoe.moe.routing import routing_task_id

logger = logging.getLogger(__name__)


def task_routing(
    model: nn.Module, task: str | None, field: str = "task"
) -> contextlib.AbstractContextManager[None]:
    """A block inside which every call of `model` (forward, generate and each of generate's KV-cached
    steps) routes every sequence by `task`, a name of its adapter's task vocabulary: the task id [1], spread
    over each row's tokens (ComoeModel.default_call_inputs; MOELoRA's gate softmax(W_T e_task), arXiv
    2310.18339). `task` None: nothing is set. InvalidSetting (a ValueError) naming `field` when the model
    does not route by task or `task` is none of its tasks (moe.routing.routing_task_id)."""
    if task is None:
        return contextlib.nullcontext()
    model = task_model(model)
    task_id = routing_task_id(getattr(model, "comoe_config", None), task, field)
    return model.default_call_inputs(task_ids=[task_id])


@torch.no_grad()
def generate_responses(
    model: nn.Module,
    tokenizer,
    examples: list[Example],
    batch_size: int,
    max_new_tokens: int,
    task: str | None = None,
    task_ids: list[int] | None = None,
) -> tuple[list[str], list[bool]]:
    """Greedy, batched (left padding), with the KV cache; and per example whether its prompt was shortened
    (from the start) so that prompt and answer fit the model's context length. A max_new_tokens that
    leaves no room for a prompt in the context (generating past the context would index past a model's
    position embeddings) is fitted, with a warning: prompts keep up to half the context and responses stop
    at its end.

    `task`: for an adapter routed by task (routing 'task', `--preset moelora-liu`), the name of one of its
    tasks (`comoe_config.tasks`) by which every prompt and every generated token is routed (task_routing);
    a ValueError naming `task` for any other model or a name outside its tasks. `task_ids`: instead, one
    id per example (its position in the adapter's tasks, -1 for a task outside them: the mean of their
    gates), each row routed by its own (comoe generate's prompts rows with a `task`). Neither: the calls
    carry the task ids the caller set (`default_call_inputs`); with none set, such an adapter is a
    ValueError naming `task` (adapter.model.require_task)."""
    if task is not None and task_ids is not None:
        raise ValueError(f"task={task!r} and task_ids: give one of them (every example's task, or each's)")
    if task_ids is not None and len(task_ids) != len(examples):
        raise ValueError(f"task_ids: {len(task_ids)} ids for {len(examples)} examples; expected one each")
    if task is None and task_ids is None:
        require_task(
            model,
            "pass task='NAME' (one of them) to route every example by it, task_ids=[...] (one id per "
            "example), or call inside comoe.evaluation.generation.task_routing(model, 'NAME')",
        )
    with task_routing(model, task):
        return _generate(model, tokenizer, examples, batch_size, max_new_tokens, task_ids)


def _generate(
    model: nn.Module,
    tokenizer,
    examples: list[Example],
    batch_size: int,
    max_new_tokens: int,
    task_ids: list[int] | None = None,
) -> tuple[list[str], list[bool]]:
    context = context_length(model)
    room = context - max_new_tokens
    if room < 1:
        room = context - context // 2
        logger.warning(
            f"max_new_tokens={max_new_tokens} does not fit the model's context of {context} tokens: prompts "
            f"keep their last {room} tokens and responses stop at the context"
        )
    texts = [render_prompt(e, tokenizer) for e in examples]
    encoded = [prompt_ids(tokenizer, text) for text in texts]
    truncated = [len(ids) > room for ids in encoded]
    prompts = [ids[-room:] for ids in encoded]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs = [""] * len(prompts)
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch", leave=False):
        chunk = order[start : start + batch_size]
        batch = left_pad([prompts[i] for i in chunk], tokenizer.pad_token_id, device)
        width = batch["input_ids"].shape[1]
        if task_ids is not None:  # each row's own task: the call's task_ids [B] (ComoeModel.generate)
            batch["task_ids"] = torch.tensor([task_ids[i] for i in chunk], device=device)
        generated = model.generate(
            **batch,
            max_new_tokens=min(max_new_tokens, context - width),  # never past the context
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row, i in enumerate(chunk):
            outputs[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True)
    return outputs, truncated


def left_pad(prompts: list[list[int]], pad_token_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Token rows left-padded to one width, as generation needs (every row's next token at the end)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
