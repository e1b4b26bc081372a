"""The LLM-Adapters (Alpaca) prompt template and response-only label masking."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label value that the causal-LM loss skips

_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_WITHOUT_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(instruction: str, input: str = "") -> str:
    """The prompt LLM-Adapters trains and evaluates with (the response follows directly)."""
    if input:
        return _WITH_INPUT.format(instruction=instruction, input=input)
    return _WITHOUT_INPUT.format(instruction=instruction)


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens: the loss is on the response only
    truncated: bool


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, cutoff: int
) -> Tokenized:
    """Token ids of prompt + response + eos with the prompt masked out of the labels.

    The prompt is tokenised on its own so that the label boundary is exact; over-long examples are cut to
    `cutoff` tokens and flagged, so callers can count them instead of dropping them silently.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = prompt_ids + response_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return Tokenized(ids[:cutoff], labels[:cutoff], truncated=len(ids) > cutoff)


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


def response_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """LM-head logits at the positions that predict a labelled token, and those tokens: ([N, V], [N]).

    The model computes logits for one position only; its final hidden states at labelled positions go
    through the head, which skips the head's FLOPs (about 20% of SmolLM2's) on prompts and padding.
    """
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        logits_to_keep=1,
        output_hidden_states=True,
    )
    targets = batch["labels"][:, 1:]
    labelled = targets != IGNORE_INDEX
    hidden = out.hidden_states[-1][:, :-1][labelled]
    head = getattr(model, "module", model).get_output_embeddings()  # unwrap DistributedDataParallel
    return head(hidden).float(), targets[labelled]
