"""Data: examples, the task registry (source, template, scoring), the LLM-Adapters files, built-in
generators, prompt templates, and tokenisation/collation."""

from comoe.data.builtin import BUILTIN_TASKS, builtin_examples
from comoe.data.example import Example
from comoe.data.llm_adapters import COMMONSENSE_TASKS, MATH_TASKS, MATH_TRAIN, load_task
from comoe.data.tasks import TASKS, Task, answer_kind, get_task, load_examples, register_task, render_prompt
from comoe.data.templates import format_prompt

__all__ = [
    "BUILTIN_TASKS",
    "COMMONSENSE_TASKS",
    "MATH_TASKS",
    "MATH_TRAIN",
    "TASKS",
    "Example",
    "Task",
    "answer_kind",
    "builtin_examples",
    "format_prompt",
    "get_task",
    "load_examples",
    "load_task",
    "register_task",
    "render_prompt",
]
