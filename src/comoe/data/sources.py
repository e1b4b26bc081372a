"""User data from files: `--data [name=]path` specs read with the `datasets` library, checked record by
record and turned into Examples that carry their template and how their answers are scored (so
evaluation scores them and analysis groups them by their tasks, with no global state).

Files: .json (a list of records), .jsonl, .parquet, .csv, or a folder written by `Dataset.save_to_disk`
(a DatasetDict's split is chosen by the caller: train for training, test or validation for evaluation).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from comoe.data.example import Example, group_by_task
from comoe.data.formats import (
    RECORD_FORMATS,
    answer_format_options,
    record_format,
    record_task,
    rename_columns,
)
from comoe.data.templates import TEMPLATE_NAMES
from comoe.errors import PLUGIN_HINT
from comoe.plugins import discover_once

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# What a file of each type holds, for the errors about one that holds none.
CONTENTS = {
    ".json": "a JSON list of records",
    ".jsonl": "one JSON record per line",
    ".parquet": "a table of records",
    ".csv": "a header row, then one record per row",
}
# What a file of each type that `datasets` finds no rows in holds instead.
NO_ROWS = {
    ".json": "an empty list, or records with no fields",
    ".jsonl": "only records with no fields",
    ".csv": "a header row alone",
}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_NUMBER = re.compile(r"^\s*-?\d+(?:\.\d+)?\s*$")


@dataclass(frozen=True)
class DataSpec:
    """One --data value: a file or datasets folder, and the task name its records get (None: their `task`
    field, else the file's stem)."""

    path: Path
    name: str | None = None

    @classmethod
    def parse(cls, text: str) -> DataSpec:
        """'path' or 'name=path' (a name is letters, digits, '_', '-', '.'; a path may contain '=')."""
        name, sep, path = text.partition("=")
        if sep and _NAME.match(name) and path:
            return cls(Path(path), name)
        return cls(Path(text))

    @property
    def default_task(self) -> str:
        return self.name or (self.path.name if self.path.is_dir() else self.path.stem)


def read_records(path: Path, split: str = "train", flag: str = "--data") -> list[dict[str, Any]]:
    """The records of one file or datasets folder, as dicts (the `datasets` library reads them).

    For a DatasetDict folder, `split` is taken (for evaluation, 'test' then 'validation')."""
    import datasets  # ~1 s to import: only when user data is read

    if not path.exists():
        raise FileNotFoundError(f"{flag} {path}: no such file or folder")
    if path.is_dir():
        return _read_dataset_folder(path, split, flag)
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"{flag} {path}: unknown file type {path.suffix or '(none)'!r}; expected "
            f"{', '.join(BUILDERS)} or a folder written by save_to_disk"
        )
    _check_contents(path, flag)
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # "Generating train split" for a local file is noise
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # pyarrow / datasets parse errors: one line naming the file
        if "corresponds to no data" in str(error):  # `[]`, a header row alone, records without fields
            suffix = path.suffix.lower()
            raise ValueError(
                f"{flag} {path}: no records ({NO_ROWS.get(suffix, 'no rows')}); expected {CONTENTS[suffix]}"
            ) from None
        cause = " ".join(str(error).split()) or type(error).__name__
        raise ValueError(f"{flag} {path}: could not be read as {builder} ({cause:.300})") from None
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()
    if len(table) == 0:
        raise ValueError(f"{flag} {path}: no records; expected {CONTENTS[path.suffix.lower()]}")
    return table.to_list()


def _read_dataset_folder(path: Path, split: str, flag: str) -> list[dict[str, Any]]:
    """The records of a save_to_disk folder: a Dataset, or of a DatasetDict the chosen split only (for
    evaluation, `split` then 'validation' then 'test'), read on its own, so that another split, empty or
    large, is never loaded. A split or dataset of no rows is named (datasets' loader fails on one)."""
    import datasets

    where = f"{flag} {path}"
    splits_file = path / "dataset_dict.json"
    if splits_file.is_file():
        try:
            have = list(json.loads(splits_file.read_text(encoding="utf-8"))["splits"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{where}: dataset_dict.json does not list the splits") from None
        wanted = [split] if split == "train" else [split, "validation", "test"]
        chosen = next((name for name in wanted if name in have), None)
        if chosen is None:
            raise ValueError(f"{where}: no {' or '.join(wanted)} split (it has {', '.join(have)})")
        path, where = path / chosen, f"{where}: the {chosen} split"
    if _saved_without_rows(path):
        raise ValueError(f"{where} has no records")
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise ValueError(
            f"{where}: a folder must be a dataset written by save_to_disk (no dataset_info.json or "
            "dataset_dict.json found)"
        ) from None
    if len(loaded) == 0:
        raise ValueError(f"{where} has no records")
    return loaded.to_list()


def _saved_without_rows(folder: Path) -> bool:
    """Whether save_to_disk wrote this Dataset folder with no data file (a dataset of no rows)."""
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("_data_files") == []


def _check_contents(path: Path, flag: str) -> None:
    """A file holds something: not empty, not only whitespace (text files), not a table of no rows
    (parquet, read from its footer); and text files are UTF-8 (the line and byte offset of the first
    invalid byte are named)."""
    expected = CONTENTS[path.suffix.lower()]
    if path.suffix.lower() == ".parquet":
        if path.stat().st_size == 0:
            raise ValueError(f"{flag} {path}: the file is empty; expected {expected}")
        import pyarrow.parquet as pq  # datasets' own dependency

        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception:  # not a parquet file: datasets names the cause
            return
        if rows == 0:
            raise ValueError(f"{flag} {path}: no records; expected {expected}")
        return
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(f"{flag} {path}: line {line} is not valid UTF-8 (byte {error.start})") from None
    if not text.strip():
        raise ValueError(f"{flag} {path}: the file is empty; expected {expected}")


def examples_from_records(
    records: Iterable[Any],
    where: str,
    default_task: str,
    fmt: str = "auto",
    template: str = "auto",
    columns: dict[str, str] | None = None,
    task_field: bool = True,
    auto_template: str | None = None,
) -> list[Example]:
    """Examples from records of one format, each with its template and its task's scoring. `where` names
    the source in errors ('<path>: record <i>: ...'); `fmt` 'auto' detects the format from the first
    record; the task is a record's `task` field if it has one (and task_field is True), else
    `default_task`. Under template 'auto', records get their format's default template, or `auto_template`
    (e.g. the one an adapter was trained with) where the format accepts it (conversations: only 'chat')."""
    if fmt != "auto" and fmt not in RECORD_FORMATS:
        discover_once()
    if fmt != "auto" and fmt not in RECORD_FORMATS:
        names = ", ".join(RECORD_FORMATS)
        raise ValueError(f"format={fmt!r} is invalid: expected auto or one of {names} ({PLUGIN_HINT})")
    if template != "auto" and template not in TEMPLATE_NAMES:
        names = ", ".join(TEMPLATE_NAMES)
        raise ValueError(f"template={template!r} is invalid: expected auto or one of {names}")
    examples = []
    first: str | None = None if fmt == "auto" else fmt
    for index, raw in enumerate(records):
        at = f"{where}: record {index}"
        record = rename_columns(raw, columns or {}) if isinstance(raw, dict) else raw
        found = record_format(record, at)
        if first is None:
            first = found.name
        if found.name != first:
            origin = "--format" if fmt != "auto" else "record 0"
            raise ValueError(
                f"{at} is a {found.name} record but {origin} says {first}: one format per source"
            )
        chosen = template
        if template == "auto":
            fits = auto_template is not None and found.accepts(auto_template)
            chosen = auto_template if fits else found.default_template
        task = record_task(record, default_task, at) if task_field else default_task
        examples.append(found.to_example(record, chosen, task, at))
    if not examples:
        raise ValueError(f"{where}: no records")
    return with_scoring(examples)


def answer_scoring(examples: list[Example]) -> str:
    """How a task of user data is scored, from its examples: 'choice' when every item has choices (or,
    LLM-Adapters style, an 'Answer format: a/b' line naming its answer), 'number' when every answer is a
    number, otherwise normalised exact match."""
    if all(e.choices or e.answer in (answer_format_options(e.instruction) or ()) for e in examples):
        return "choice"
    if all(_NUMBER.match(e.answer) for e in examples):
        return "number"
    return "exact"


def with_scoring(examples: list[Example]) -> list[Example]:
    """The examples of one source, each carrying its task's scoring (answer_scoring over the task's
    examples in this source)."""
    groups = group_by_task(examples)
    scoring = {task: answer_scoring([examples[i] for i in indices]) for task, indices in groups.items()}
    return [replace(example, scoring=scoring[example.task]) for example in examples]


def load_data(
    specs: list[str],
    split: str = "train",
    fmt: str = "auto",
    template: str = "auto",
    columns: dict[str, str] | None = None,
    flag: str = "--data",
    auto_template: str | None = None,
) -> list[Example]:
    """The examples of every --data spec, in order, each with its template and scoring (auto_template: see
    examples_from_records)."""
    examples: list[Example] = []
    for text in specs:
        spec = DataSpec.parse(text)
        records = read_records(spec.path, split, flag)
        examples += examples_from_records(  # name=path names every record's task
            records,
            str(spec.path),
            spec.default_task,
            fmt,
            template,
            columns,
            task_field=spec.name is None,
            auto_template=auto_template,
        )
    return examples
