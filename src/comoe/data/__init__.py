"""Data: examples (each carrying its template), the task registry (source, splits, scoring), the
LLM-Adapters files, built-in generators, your own files and their record formats, example selection,
prompt templates and rendering, and tokenisation/collation."""

from comoe.data.builtin import BUILTIN_TASKS, builtin_examples
from comoe.data.example import Example
from comoe.data.formats import RECORD_FORMATS, RecordFormat, register_format
from comoe.data.llm_adapters import COMMONSENSE_TASKS, MATH_TASKS, MATH_TRAIN, load_task
from comoe.data.prompts import render_prompt
from comoe.data.selection import load_examples, select_examples
from comoe.data.sources import examples_from_records, load_data
from comoe.data.tasks import TASKS, Task, answer_kind, get_task, register_task
from comoe.data.templates import format_prompt

__all__ = [
    "BUILTIN_TASKS",
    "COMMONSENSE_TASKS",
    "MATH_TASKS",
    "MATH_TRAIN",
    "RECORD_FORMATS",
    "TASKS",
    "Example",
    "RecordFormat",
    "Task",
    "answer_kind",
    "builtin_examples",
    "examples_from_records",
    "format_prompt",
    "get_task",
    "load_data",
    "load_examples",
    "load_task",
    "register_format",
    "register_task",
    "render_prompt",
    "select_examples",
]
