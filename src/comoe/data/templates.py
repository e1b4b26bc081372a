"""Prompt templates by name: how an example's instruction and input become the text the model continues
(conversations use the tokenizer's chat template instead: comoe.data.chat)."""

from __future__ import annotations

from collections.abc import Callable

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
    """The Alpaca prompt LLM-Adapters trains and evaluates with (the response follows directly)."""
    if input:
        return _WITH_INPUT.format(instruction=instruction, input=input)
    return _WITHOUT_INPUT.format(instruction=instruction)


def plain_prompt(instruction: str, input: str = "") -> str:
    """No template: the instruction (and input on the next line) as they are."""
    return f"{instruction}\n{input}" if input else instruction


TEMPLATES: dict[str, Callable[[str, str], str]] = {"alpaca": format_prompt, "none": plain_prompt}
# Every template a task may use: the text templates above, and 'chat' (the tokenizer's own chat template,
# applied to an example's messages: comoe.data.chat).
TEMPLATE_NAMES = (*TEMPLATES, "chat")
