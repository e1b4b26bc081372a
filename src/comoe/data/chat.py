"""Conversations through the tokenizer's own chat template, split into the spans that are learned.

A chat template is a Jinja program, so where an assistant turn begins and ends in its output cannot be read
from the template itself. It is found by rendering prefixes instead: the conversation up to turn i with the
generation prompt (what the model sees when it is asked to answer) and up to turn i inclusive. The text
between the two is what the assistant says, with the template's end-of-turn marker, and it is learned;
everything else (system prompt, user turns, role headers) is context. This works for any template that
renders a conversation prefix by prefix (those of Llama 3, Qwen, SmolLM, Gemma, Mistral do), needs no
`{% generation %}` markers, and is checked: a template that rewrites earlier turns is refused by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")
Segments = list[tuple[str, bool]]  # (text, learned) in order; their concatenation is the whole example


def chat_text(
    tokenizer: PreTrainedTokenizerBase, messages: tuple[tuple[str, str], ...], generation_prompt: bool
) -> str:
    """The conversation rendered by the tokenizer's chat template (text, special tokens spelled out)."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"template 'chat': the tokenizer of {name} has no chat template; use --template alpaca or none, "
            "or a model whose tokenizer has one"
        )
    rows = [{"role": role, "content": content} for role, content in messages]
    return tokenizer.apply_chat_template(rows, tokenize=False, add_generation_prompt=generation_prompt)


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: tuple[tuple[str, str], ...]) -> str:
    """What the model continues to answer: the turns before the last assistant turn (all turns when the
    conversation does not end with one) and the template's generation prompt."""
    if messages and messages[-1][0] == "assistant":
        messages = messages[:-1]
    return chat_text(tokenizer, messages, generation_prompt=True)


def chat_segments(tokenizer: PreTrainedTokenizerBase, messages: tuple[tuple[str, str], ...]) -> Segments:
    """The rendered conversation as (text, learned) spans: every assistant turn learned, all else context."""
    segments: Segments = []
    done = ""
    for turn, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        prompt = chat_text(tokenizer, messages[:turn], generation_prompt=True)
        full = chat_text(tokenizer, messages[: turn + 1], generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            name = getattr(tokenizer, "name_or_path", "this tokenizer")
            raise ValueError(
                f"the chat template of {name} does not render "
                f"conversations prefix by prefix (assistant turn {turn} changes the text before it), so the "
                "learned spans cannot be found; use --template alpaca or none"
            )
        segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    whole = chat_text(tokenizer, messages, generation_prompt=False)
    if whole.startswith(done) and len(whole) > len(done):  # turns after the last assistant turn: context
        segments.append((whole[len(done) :], False))
    return [(text, learned) for text, learned in segments if text]
