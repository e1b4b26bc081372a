"""An example rendered in its own template (`Example.template`): the prompt the model continues, and the
(text, learned) spans training learns from. No registry is consulted: the example carries its template."""

from __future__ import annotations

from typing import TYPE_CHECKING

from comoe.data.chat import Segments, chat_prompt, chat_segments
from comoe.data.example import Example
from comoe.data.templates import TEMPLATES

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def render_prompt(example: Example, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """The prompt text of an example, in its template (the 'chat' template needs the tokenizer)."""
    if example.template == "chat":
        if tokenizer is None:
            raise ValueError(f"task {example.task!r} uses the chat template: its prompts need the tokenizer")
        return chat_prompt(tokenizer, example.messages)
    return TEMPLATES[example.template](example.instruction, example.input)


def training_segments(example: Example, tokenizer: PreTrainedTokenizerBase) -> tuple[Segments, bool]:
    """What an example trains on, as (text, learned) spans, and whether eos follows (text templates: the
    prompt, then the output; conversations: every assistant turn learned, ending with the template's own
    end-of-turn marker, so no eos is added)."""
    if example.template == "chat":
        return chat_segments(tokenizer, example.messages), False
    return [(render_prompt(example), False), (example.output, True)], True
