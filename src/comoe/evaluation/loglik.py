"""Multiple choice by log-likelihood: the summed log-probability of each option's response."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from comoe.data.collate import IGNORE_INDEX, pad_batch, tokenize_example
from comoe.data.example import Example
from comoe.data.tasks import render_prompt
from comoe.evaluation.scoring import choice_options, choice_response
from comoe.models.head import response_logits


@torch.no_grad()
def option_loglikelihoods(
    model: nn.Module, tokenizer, examples: list[Example], batch_size: int, window: int | None = None
) -> tuple[list[list[float]], list[bool]]:
    """Sum of log-probabilities of each option's response given the prompt, batched over all options; and
    per example whether its prompt had to be shortened to fit.

    The sequences are exactly the training format (prompt + response + eos), so a fine-tuned model is
    scored on what it learnt to write; only response positions go through the LM head. Every option is
    scored whole: a sequence longer than `window` (default: the model's context length) loses tokens from
    the start of its prompt, and the example is reported as truncated.
    """
    window = window or context_length(model)
    items, owners = [], []
    for index, example in enumerate(examples):
        prompt = render_prompt(example)
        for option in choice_options(example):
            items.append(
                tokenize_example(tokenizer, prompt, choice_response(option), window, keep_response=True)
            )
            owners.append(index)
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    scores = [0.0] * len(items)
    for start in tqdm(range(0, len(order), batch_size), desc="score options", unit="batch", leave=False):
        chunk = order[start : start + batch_size]
        batch = pad_batch([items[i] for i in chunk], tokenizer.pad_token_id)
        logits, targets = response_logits(model, batch)
        logprobs = torch.log_softmax(logits, dim=-1)
        token_scores = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)
        rows = (batch["labels"][:, 1:] != IGNORE_INDEX).nonzero()[:, 0]
        per_row = torch.zeros(len(chunk)).index_add_(0, rows, token_scores)
        for position, item in enumerate(chunk):
            scores[item] = float(per_row[position])
    grouped: list[list[float]] = [[] for _ in examples]
    truncated = [False] * len(examples)
    for owner, score, item in zip(owners, scores, items, strict=True):
        grouped[owner].append(score)
        truncated[owner] |= item.truncated
    return grouped, truncated


def context_length(model: nn.Module, default: int = 2048) -> int:
    """The number of positions the model was trained for (config.max_position_embeddings)."""
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", None) or default)
