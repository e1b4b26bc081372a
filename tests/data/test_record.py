"""The data record of an adapter folder: counts and templates read from the training examples themselves,
and the template `comoe generate` and `comoe eval --data` prompt with."""

import json

import pytest

from comoe.data import Example
from comoe.data.record import DATA_RECORD, trained_answers, trained_template, write_data_record


def test_the_record_counts_each_task_and_names_the_shared_template(tmp_path):
    examples = [Example("a", "q", "", "o", "o", template="chat")] * 3 + [
        Example("b", "q", "", "o", "o", template="chat")
    ]
    write_data_record(tmp_path, examples)
    record = json.loads((tmp_path / DATA_RECORD).read_text())
    assert record == {
        "template": "chat",
        "tasks": {
            "a": {"examples": 3, "template": "chat", "answers": {"o": 3}, "distinct_answers": 1},
            "b": {"examples": 1, "template": "chat", "answers": {"o": 1}, "distinct_answers": 1},
        },
    }
    assert trained_template(tmp_path) == "chat"


def test_mixed_templates_share_none_and_builtin_tasks_record_alpaca(tmp_path):
    examples = [Example("chain_sum", "q", "", "o", "o"), Example("mine", "q", "", "o", "o", template="none")]
    write_data_record(tmp_path, examples)
    record = json.loads((tmp_path / DATA_RECORD).read_text())
    assert record["template"] is None
    assert {task: row["template"] for task, row in record["tasks"].items()} == {
        "chain_sum": "alpaca",
        "mine": "none",
    }
    assert trained_template(tmp_path) is None


def test_an_old_or_missing_record_reads_as_unknown_and_a_broken_one_is_refused(tmp_path):
    assert trained_template(None) is None and trained_template(tmp_path) is None
    (tmp_path / DATA_RECORD).write_text(json.dumps({"template": "none", "tasks": {"t": {"examples": 2}}}))
    assert trained_template(tmp_path) == "none"
    (tmp_path / DATA_RECORD).write_text("[oops")
    with pytest.raises(ValueError, match="not a valid comoe data record"):
        trained_template(tmp_path)


def test_the_record_keeps_each_tasks_most_frequent_answers_and_old_records_read_as_unknown(tmp_path):
    examples = [Example("yn", "q", "", f"the answer is {a}", a) for a in ["yes"] * 5 + ["no"] * 3]
    examples += [Example("sum", "q", "", str(n), str(n)) for n in range(30)]
    write_data_record(tmp_path, examples)
    assert trained_answers(tmp_path)["yn"] == {"examples": 8, "answers": {"yes": 5, "no": 3}}
    record = json.loads((tmp_path / DATA_RECORD).read_text())["tasks"]["sum"]
    assert len(record["answers"]) == 20 and record["distinct_answers"] == 30  # the 20 most frequent kept
    assert trained_answers(None) == {} and trained_answers(tmp_path / "nowhere") == {}
    (tmp_path / DATA_RECORD).write_text(json.dumps({"template": "none", "tasks": {"t": {"examples": 2}}}))
    assert trained_answers(tmp_path) == {}  # written before answers were recorded


def test_one_load_reads_the_record_once_and_a_rewritten_record_again(tmp_path, monkeypatch):
    import os
    from pathlib import Path

    from comoe.data.record import trained_answers, trained_quantization, trained_template

    record = tmp_path / "comoe_data.json"
    record.write_text('{"template": "chat", "quantization": "4bit", "tasks": {}}')
    reads = []
    real = Path.read_text

    def counted(self, *args, **kwargs):
        reads.append(self.name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counted)
    assert (trained_template(tmp_path), trained_quantization(tmp_path), trained_answers(tmp_path)) == (
        "chat",
        "4bit",
        {},
    )
    assert reads.count("comoe_data.json") == 1
    record.write_text('{"template": "alpaca"}')
    os.utime(record, ns=(1, 2))  # a different version even within the clock's resolution
    assert trained_template(tmp_path) == "alpaca" and reads.count("comoe_data.json") == 2
