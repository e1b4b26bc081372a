"""Multiple choice by log-likelihood: the summed log-probability of each option's response.

Every option of a question shares the question's prompt, which is most of the tokens (an ARC question's
prompt is ~100 tokens, each option's response ~10). The default path therefore encodes each prompt once and
scores every option as a continuation from the prompt's KV cache; the plain path, which runs prompt + option
once per option (as lm-evaluation-harness does), is kept as the reference it is tested against and for the
questions the cached path cannot take (a prompt cut to fit the window, a sliding-window model whose window
the question exceeds).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationMixin

from comoe.adapter.model import require_task
from comoe.data.collate import IGNORE_INDEX, pad_batch, prompt_ids, tokenize_example
from comoe.data.example import Example
from comoe.data.prompts import render_prompt
from comoe.evaluation.scoring import choice_options, option_response
from comoe.models.head import head_logits, response_logits, unwrap_model

# The keyword a model's forward takes its KV cache by: renamed from past_key_values to cache in
# transformers 5.2x (the old name warns there); both releases are supported.
CACHE_KEYWORD = (
    "cache"
    if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    else "past_key_values"
)


@dataclass
class Question:
    """One multiple-choice question in tokens: the shared prompt and each option's response (+ eos)."""

    index: int  # position in the caller's example list
    prompt: list[int]
    responses: list[list[int]]


def option_loglikelihoods(
    model: nn.Module,
    tokenizer,
    examples: list[Example],
    batch_size: int,
    window: int | None = None,
    prompt_cache: bool = True,
) -> tuple[list[list[float]], list[bool]]:
    """Sum of log-probabilities of each option's response given the prompt; and per example whether its
    prompt had to be shortened to fit.

    The sequences are exactly the training format (prompt + response + eos), so a fine-tuned model is
    scored on what it learnt to write; only response positions go through the LM head. Every option is
    scored whole: a sequence longer than `window` (default: the model's context length) loses tokens from
    the start of its prompt, and the example is reported as truncated. `batch_size`: questions per
    forward on the cached path, sequences per forward on the plain one. An adapter routed by task scores
    with the task ids the caller set (inside comoe.evaluation.generation.task_routing); with none set, a
    ValueError naming `task` (adapter.model.require_task).
    """
    require_task(
        model,
        "call option_loglikelihoods inside comoe.evaluation.generation.task_routing(model, 'NAME') (one of "
        "them), or model.default_call_inputs(task_ids=[...])",
    )
    window = window or context_length(model)
    # prompt-aware routing (MiLoRA) decides per prompt row; a cache repeated per option has no such rows
    prompt_cache = prompt_cache and not getattr(unwrap_model(model), "reads_prompt", False)
    scores: list[list[float]] = [[] for _ in examples]
    truncated = [False] * len(examples)
    plain: list[int] = []
    cached: list[Question] = []
    limit = min(window, sliding_window(model) or window)
    for index, example in enumerate(examples):
        question = tokenize_question(tokenizer, example, index)
        longest = len(question.prompt) + max(len(r) for r in question.responses)
        if prompt_cache and longest <= limit and question.prompt:
            cached.append(question)
        else:
            plain.append(index)
    for question, question_scores in zip(cached, cached_scores(model, cached, batch_size), strict=True):
        scores[question.index] = question_scores
    if plain:
        chosen = [examples[i] for i in plain]
        for index, (question_scores, cut) in zip(
            plain, zip(*plain_scores(model, tokenizer, chosen, batch_size, window), strict=True), strict=True
        ):
            scores[index], truncated[index] = question_scores, cut
    return scores, truncated


def tokenize_question(tokenizer, example: Example, index: int) -> Question:
    """The prompt tokenised on its own (the training format's exact boundary) and every option's response."""
    prompt = prompt_ids(tokenizer, render_prompt(example, tokenizer))
    responses = [
        tokenizer(option_response(example, option), add_special_tokens=False)["input_ids"]
        + [tokenizer.eos_token_id]
        for option in choice_options(example)
    ]
    return Question(index, prompt, responses)


@torch.no_grad()
def cached_scores(model: nn.Module, questions: list[Question], batch_size: int) -> list[list[float]]:
    """Per-option scores of each question, the prompt encoded once per question.

    Questions are sorted by prompt length and taken `batch_size` at a time; their options (2-5 each) form
    the continuation batch. That is two forwards per group, against one per `batch_size` options on the
    plain path, which matters where a forward's fixed cost dominates, as on a GPU. The prompts go through
    the model right-padded (a real token never attends to padding, so no row is fully masked); the cache
    is then repeated once per option and the options run as one continuation batch whose attention mask
    hides each prompt's padding and whose position ids continue each prompt's own length.
    """
    order = sorted(range(len(questions)), key=lambda i: len(questions[i].prompt))
    groups = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    results: list[list[float]] = [[] for _ in questions]
    for group in tqdm(groups, desc="score options", unit="batch", leave=False):
        for i, question_scores in zip(group, score_group(model, [questions[i] for i in group]), strict=True):
            results[i] = question_scores
    return results


def score_group(model: nn.Module, questions: list[Question]) -> list[list[float]]:
    """One prompt pass and one continuation pass for a group of questions (see cached_scores)."""
    device = next(model.parameters()).device
    lengths = torch.tensor([len(q.prompt) for q in questions], device=device)
    prompt_ids = right_pad([q.prompt for q in questions], device)
    prompt_mask = (torch.arange(prompt_ids.shape[1], device=device) < lengths[:, None]).long()
    out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        use_cache=True,
        logits_to_keep=1,
        output_hidden_states=True,
    )
    last = out.hidden_states[-1][torch.arange(len(questions), device=device), lengths - 1]
    first_logprobs = torch.log_softmax(
        head_logits(model, last), dim=-1
    )  # [questions, V]: first response token

    owners = [row for row, q in enumerate(questions) for _ in q.responses]
    responses = [r for q in questions for r in q.responses]
    owner = torch.tensor(owners, device=device)
    cache = out[CACHE_KEYWORD]
    cache.reorder_cache(owner)  # one copy of its prompt's cache per option
    widths = torch.tensor([len(r) for r in responses], device=device)
    continuation = right_pad(responses, device)
    steps = torch.arange(continuation.shape[1], device=device)
    out = model(
        input_ids=continuation,
        attention_mask=torch.cat([prompt_mask[owner], (steps < widths[:, None]).long()], dim=1),
        position_ids=lengths[owner, None] + steps,
        use_cache=True,
        **{CACHE_KEYWORD: cache},
        logits_to_keep=1,
        output_hidden_states=True,
    )
    predicts = steps[:-1] < (widths[:, None] - 1)  # position j predicts response token j + 1
    logprobs = torch.log_softmax(head_logits(model, out.hidden_states[-1][:, :-1][predicts]), dim=-1)
    targets = continuation[:, 1:][predicts]
    rows = predicts.nonzero()[:, 0]
    per_option = torch.zeros(len(responses), device=device, dtype=torch.float32)
    per_option.index_add_(0, rows, logprobs.gather(1, targets[:, None]).squeeze(1))
    per_option += first_logprobs[owner].gather(1, continuation[:, :1]).squeeze(1)
    values = per_option.tolist()
    grouped: list[list[float]] = [[] for _ in questions]
    for row, value in zip(owners, values, strict=True):
        grouped[row].append(value)
    return grouped


def right_pad(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    """Token rows right-padded with 0 (the padding is masked, its id never matters)."""
    ids = torch.zeros((len(rows), max(len(r) for r in rows)), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids.to(device)


@torch.no_grad()
def plain_scores(
    model: nn.Module, tokenizer, examples: list[Example], batch_size: int, window: int
) -> tuple[list[list[float]], list[bool]]:
    """The reference: prompt + option run once per option, batched over all options."""
    device = next(model.parameters()).device
    items, owners = [], []
    for index, example in enumerate(examples):
        prompt = render_prompt(example, tokenizer)
        for option in choice_options(example):
            response = option_response(example, option)
            items.append(tokenize_example(tokenizer, prompt, response, window, keep_response=True))
            owners.append(index)
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    scores = [0.0] * len(items)
    for start in tqdm(range(0, len(order), batch_size), desc="score options", unit="batch", leave=False):
        chunk = order[start : start + batch_size]
        batch = pad_batch([items[i] for i in chunk], tokenizer.pad_token_id)
        batch = {key: value.to(device) for key, value in batch.items()}
        logits, targets = response_logits(model, batch)
        logprobs = torch.log_softmax(logits, dim=-1)
        token_scores = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)
        rows = (batch["labels"][:, 1:] != IGNORE_INDEX).nonzero()[:, 0]
        per_row = torch.zeros(len(chunk), device=device).index_add_(0, rows, token_scores)
        for position, item in enumerate(per_row.tolist()):
            scores[chunk[position]] = item
    grouped: list[list[float]] = [[] for _ in examples]
    truncated = [False] * len(examples)
    for owner, score, item in zip(owners, scores, items, strict=True):
        grouped[owner].append(score)
        truncated[owner] |= item.truncated
    return grouped, truncated


CONTEXT_KEYS = ("max_position_embeddings", "n_positions")  # GPT-2's config maps the first to the second


def context_length(model: nn.Module, default: int = 2048) -> int:
    """The number of positions the model was trained for: its config's max_position_embeddings (GPT-2:
    n_positions; a multimodal model's text_config), or `default` when the config names none (T5, BLOOM:
    relative or ALiBi positions). Evaluation, generation, training and analysis all cut to it."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for key in CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def within_context(model: nn.Module, cutoff: int) -> int:
    """The length examples are cut at: `cutoff`, or the model's context when that is shorter (a longer
    sequence would index past its position embeddings); `cutoff` for a model whose config names none."""
    return min(cutoff, context_length(model, default=cutoff))


def sliding_window(model: nn.Module) -> int | None:
    """The attention window of a model with sliding-window layers (Gemma 2/3, Mistral), else None.

    A sliding-window cache keeps only the last `window` positions, so a question longer than that is
    scored on the plain path, where the model sees it exactly as in training.
    """
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    value = getattr(text, "sliding_window", None)
    return int(value) if value else None
