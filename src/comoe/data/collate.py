"""Tokenisation with response-only labels, and padding into batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from comoe.data.example import Example
from comoe.data.tasks import render_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label value that the causal-LM loss skips


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens: the loss is on the response only
    truncated: bool


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, cutoff: int, keep_response: bool = False
) -> Tokenized:
    """Token ids of prompt + response + eos with the prompt masked out of the labels.

    The prompt is tokenised on its own so that the label boundary is exact. Over-long examples are cut to
    `cutoff` tokens and flagged, so callers can count them instead of dropping them silently: from the end
    (training, as LLM-Adapters), or with keep_response from the start of the prompt, so that a scored
    response is always scored whole (evaluation).
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    truncated = len(prompt_ids) + len(response_ids) > cutoff
    if truncated and keep_response and len(response_ids) < cutoff:
        prompt_ids = prompt_ids[len(prompt_ids) + len(response_ids) - cutoff :]
    ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return Tokenized(ids[:cutoff], labels[:cutoff], truncated=truncated)


def encode_examples(
    tokenizer: PreTrainedTokenizerBase, examples: list[Example], cutoff: int
) -> tuple[list[Tokenized], int]:
    """Every example as prompt (in its task's template) + reference response; and how many were cut."""
    items = [tokenize_example(tokenizer, render_prompt(e), e.output, cutoff) for e in examples]
    return items, sum(item.truncated for item in items)


def pad_batch(items: list[Tokenized], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask, and labels ignored on padding."""
    width = max(len(item.input_ids) for item in items)
    ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
