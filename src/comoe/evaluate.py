"""Evaluation as LLM-Adapters does it: multiple choice by comparing the log-likelihood of each option, or
generation with answer extraction (last number for math, a letter for AQuA), per task with a 95% CI."""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from comoe.data import Example, answer_kind, load_examples
from comoe.io import atomic_write_text
from comoe.prompts import IGNORE_INDEX, format_prompt, pad_batch, response_logits, tokenize_example

_ANSWER_FORMAT = re.compile(r"Answer format:\s*(\S+)\s*$")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
NUMBER_TOLERANCE = 1e-3  # LLM-Adapters counts |prediction - answer| <= 0.001 as correct


def choice_options(example: Example) -> list[str]:
    """The option words of a commonsense example, from its 'Answer format: a/b/c' line."""
    match = _ANSWER_FORMAT.search(example.instruction.strip())
    if match is None:
        raise ValueError(f"{example.task}: example has no 'Answer format:' line to read options from")
    return match.group(1).split("/")


def choice_response(option: str) -> str:
    return f"the correct answer is {option}"


def extract_answer(kind: str, text: str, options: list[str] | None = None) -> str | None:
    """The answer a generated text commits to, or None.

    choice: the first option word mentioned (as LLM-Adapters); number: the last number (commas dropped);
    letter: the letter in 'answer is (X)' if present, else the last standalone A-E; exact: the first line.
    """
    if kind == "choice":
        found = re.findall("|".join(sorted(map(re.escape, options or []), key=len, reverse=True)), text)
        return found[0] if found else None
    if kind == "number":
        found = _NUMBER.findall(text.replace(",", ""))
        return found[-1] if found else None
    if kind == "letter":
        stated = re.findall(r"answer is \(?([A-E])\)?", text)
        found = stated or re.findall(r"\b([A-E])\b", text)
        return found[-1] if found else None
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else None


def is_correct(kind: str, predicted: str | None, answer: str) -> bool:
    if predicted is None:
        return False
    if kind == "number":
        try:
            return abs(float(predicted) - float(answer)) <= NUMBER_TOLERANCE
        except ValueError:
            return False
    if kind == "exact":
        return predicted.strip().rstrip(".").lower() == answer.strip().rstrip(".").lower()
    return predicted == answer


@torch.no_grad()
def option_loglikelihoods(
    model: nn.Module, tokenizer, examples: list[Example], batch_size: int, cutoff: int = 512
) -> list[list[float]]:
    """Sum of log-probabilities of each option's response given the prompt, batched over all options.

    The sequences are exactly the training format (prompt + response + eos), so a fine-tuned model is
    scored on what it learnt to write; only response positions go through the LM head.
    """
    items, owners = [], []
    for index, example in enumerate(examples):
        prompt = format_prompt(example.instruction, example.input)
        for option in choice_options(example):
            items.append(tokenize_example(tokenizer, prompt, choice_response(option), cutoff))
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
    for owner, score in zip(owners, scores, strict=True):
        grouped[owner].append(score)
    return grouped


@torch.no_grad()
def generate_responses(
    model: nn.Module, tokenizer, examples: list[Example], batch_size: int, max_new_tokens: int
) -> list[str]:
    """Greedy, batched (left padding), with the KV cache."""
    prompts = [
        tokenizer(format_prompt(e.instruction, e.input), add_special_tokens=False)["input_ids"]
        for e in examples
    ]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch", leave=False):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(chunk):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row, i in enumerate(chunk):
            outputs[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True)
    return outputs


def wilson_interval(correct: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval for an accuracy: sensible at small n and near 0 or 1."""
    if n == 0:
        return [0.0, 0.0]
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


@dataclass
class Prediction:
    task: str
    answer: str
    predicted: str | None
    correct: bool
    response: str = ""


def predict(
    model: nn.Module,
    tokenizer,
    examples: list[Example],
    mode: str,
    batch_size: int = 8,
    max_new_tokens: int = 32,
) -> list[Prediction]:
    """Score every example: 'loglik' for choice tasks (others always generate), or 'generate'."""
    predictions: list[Prediction | None] = [None] * len(examples)
    scored = [i for i, e in enumerate(examples) if mode == "loglik" and answer_kind(e.task) == "choice"]
    generated = sorted(set(range(len(examples))) - set(scored))
    if scored:
        chosen = [examples[i] for i in scored]
        for i, example, scores in zip(
            scored, chosen, option_loglikelihoods(model, tokenizer, chosen, batch_size), strict=True
        ):
            best = choice_options(example)[max(range(len(scores)), key=scores.__getitem__)]
            predictions[i] = Prediction(example.task, example.answer, best, best == example.answer)
    if generated:
        chosen = [examples[i] for i in generated]
        texts = generate_responses(model, tokenizer, chosen, batch_size, max_new_tokens)
        for i, example, text in zip(generated, chosen, texts, strict=True):
            kind = answer_kind(example.task)
            options = choice_options(example) if kind == "choice" else None
            guess = extract_answer(kind, text, options)
            predictions[i] = Prediction(
                example.task, example.answer, guess, is_correct(kind, guess, example.answer), text
            )
    return predictions  # type: ignore[return-value]


def summarise(predictions: list[Prediction]) -> dict[str, Any]:
    tasks: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(p.task for p in predictions):
        rows = [p for p in predictions if p.task == name]
        correct = sum(p.correct for p in rows)
        tasks[name] = {
            "accuracy": correct / len(rows),
            "n": len(rows),
            "ci95": wilson_interval(correct, len(rows)),
        }
    average = sum(t["accuracy"] for t in tasks.values()) / len(tasks) if tasks else 0.0
    return {"tasks": tasks, "average": average}


def load_for_eval(model_name: str, adapter: str | None) -> tuple[nn.Module, Any]:
    """The base model, with a comoe or PEFT adapter folder applied when given.

    The adapter folder is checked before the (slower) base model is loaded, so a bad path fails fast.
    """
    from comoe.config import ComoeConfig
    from comoe.model import WEIGHTS_NAME, ComoeModel
    from comoe.models import load_base

    if adapter is None:
        return load_base(model_name)
    config_path = Path(adapter) / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"--adapter {adapter}: no adapter_config.json there")
    if not (Path(adapter) / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{Path(adapter) / WEIGHTS_NAME}: adapter weights not found")
    try:
        is_comoe = json.loads(config_path.read_text(encoding="utf-8")).get("adapter_type") == "comoe"
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path}: not valid JSON ({error})") from None
    if is_comoe:
        ComoeConfig.load(adapter)  # validates every field before the base model is loaded
    base, tokenizer = load_base(model_name)
    if is_comoe:
        return ComoeModel.from_pretrained(base, adapter), tokenizer
    from peft import PeftModel

    return PeftModel.from_pretrained(base, adapter).eval(), tokenizer


def run_eval(
    model_name: str,
    adapter: str | None,
    data_dir: str | None,
    tasks: list[str] | None,
    limit: int | None,
    mode: str = "loglik",
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    seed: int = 0,
    output: str | None = None,
) -> dict[str, Any]:
    """Evaluate and (optionally) write the report JSON; returns it."""
    model, tokenizer = load_for_eval(model_name, adapter)
    examples = load_examples(data_dir, tasks, "test", limit, seed)
    if max_new_tokens is None:  # math needs room for a chain of thought; answers elsewhere are short
        max_new_tokens = 256 if any(answer_kind(e.task) in ("number", "letter") for e in examples) else 32
    start = time.perf_counter()
    predictions = predict(model, tokenizer, examples, mode, batch_size, max_new_tokens)
    report = summarise(predictions)
    report.update(
        model=model_name,
        adapter=adapter,
        data_dir=data_dir,
        mode=mode,
        limit=limit,
        seed=seed,
        max_new_tokens=max_new_tokens,
        seconds=round(time.perf_counter() - start, 1),
        examples=[vars(p) for p in predictions],
    )
    if output:
        atomic_write_text(output, json.dumps(report, indent=2) + "\n")
    return report
