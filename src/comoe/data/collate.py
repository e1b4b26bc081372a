"""Tokenisation with response-only labels, and padding into batches."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from comoe.data.chat import Segments
from comoe.data.example import Example
from comoe.data.prompts import training_segments

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label value that the causal-LM loss skips


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens: the loss is on the response only
    truncated: bool


def prompt_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of the text that begins a sequence, with the BOS token when the tokenizer adds one by
    default (Gemma, Llama 2/3; SmolLM2 adds none) and the text does not spell it already (chat templates
    do). Without it, such models see every prompt out of distribution."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos) and _adds_bos(tokenizer):
        ids = [bos, *ids]
    return ids


@functools.lru_cache(maxsize=8)
def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer starts a sequence with BOS by default (probed once per tokenizer, not once per
    example)."""
    return tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, cutoff: int, keep_response: bool = False
) -> Tokenized:
    """Token ids of prompt + response + eos with the prompt masked out of the labels.

    The prompt is tokenised on its own so that the label boundary is exact. Over-long examples are cut to
    `cutoff` tokens and flagged, so callers can count them instead of dropping them silently: from the end
    (training, as LLM-Adapters), or with keep_response from the start of the prompt, so that a scored
    response is always scored whole (evaluation).
    """
    prompt = prompt_ids(tokenizer, prompt)
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    truncated = len(prompt) + len(response_ids) > cutoff
    if truncated and keep_response and len(response_ids) < cutoff:
        prompt = prompt[len(prompt) + len(response_ids) - cutoff :]
    ids = prompt + response_ids
    labels = [IGNORE_INDEX] * len(prompt) + response_ids
    return Tokenized(ids[:cutoff], labels[:cutoff], truncated=truncated)


def tokenize_segments(
    tokenizer: PreTrainedTokenizerBase, segments: Segments, cutoff: int, eos: bool
) -> Tokenized:
    """Token ids of (text, learned) spans, labels on the learned ones only; eos (learned) at the end if asked.

    Each span is tokenised on its own, so a label boundary is exactly a span boundary even where the
    tokenizer would merge characters across it (as torchtune tokenises each message separately); it is
    also how the prompt is tokenised at inference, alone. Cut to `cutoff` tokens from the end, flagged.
    """
    ids: list[int] = []
    labels: list[int] = []
    for index, (text, learned) in enumerate(segments):
        part = (
            prompt_ids(tokenizer, text)
            if index == 0
            else tokenizer(text, add_special_tokens=False)["input_ids"]
        )
        ids += part
        labels += part if learned else [IGNORE_INDEX] * len(part)
    if eos:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return Tokenized(ids[:cutoff], labels[:cutoff], truncated=len(ids) > cutoff)


def encode_examples(
    tokenizer: PreTrainedTokenizerBase, examples: list[Example], cutoff: int
) -> tuple[list[Tokenized], int]:
    """Every example as its template renders it for training (prompt + reference response, or a
    conversation with its assistant turns learned); and how many were cut."""
    items = []
    for example in examples:
        segments, eos = training_segments(example, tokenizer)
        items.append(tokenize_segments(tokenizer, segments, cutoff, eos=eos))
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
