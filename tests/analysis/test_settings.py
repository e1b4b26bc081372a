"""comoe.analysis.settings: AnalyzeArgs needs an adapter and an output folder, and checks its numbers."""

import pytest

from comoe.analysis.settings import AnalyzeArgs
from comoe.settings import load_settings
from comoe.validation import InvalidSetting


def test_defaults_route_fifty_seeded_examples_per_task_in_batches_of_eight():
    args = AnalyzeArgs(adapter="runs/x/adapter", output="out")
    assert (args.model, args.limit, args.batch_size, args.cutoff, args.seed) == (
        None,  # the base the adapter records
        50,
        8,
        256,
        0,
    )
    assert (args.dtype, args.device, args.data_dir, args.tasks, args.data) == (
        "float32",
        "auto",
        None,
        None,
        None,
    )
    assert AnalyzeArgs(adapter="a", output="o", limit=None).limit is None  # every example


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"output": "o"}, "adapter: required (--adapter on the command line)"),
        ({"adapter": "", "output": "o"}, "adapter: required"),
        ({"adapter": "a"}, "output: required (--output on the command line)"),
        (
            {"adapter": "a", "output": "o", "batch_size": 0},
            "batch_size=0 is invalid: expected an integer >= 1",
        ),
        ({"adapter": "a", "output": "o", "cutoff": -1}, "cutoff=-1 is invalid: expected an integer >= 1"),
        ({"adapter": "a", "output": "o", "limit": 0}, "limit=0 is invalid: expected an integer >= 1"),
        ({"adapter": "a", "output": "o", "dtype": "int4"}, "dtype='int4' is invalid"),
        ({"adapter": "a", "output": "o", "data": ["x.jsonl"], "tasks": ["boolq"]}, "data is exclusive"),
    ],
)
def test_bad_values_are_named(values, message):
    with pytest.raises(ValueError) as info:
        AnalyzeArgs(**values)
    assert str(info.value).startswith(message)


def test_required_fields_are_checked_after_the_data_and_placement():
    """A bad dtype is reported even without an adapter (the first problem a user can fix in the flags)."""
    with pytest.raises(InvalidSetting, match="^dtype="):
        AnalyzeArgs(dtype="fp4")


def test_flags_override_the_yaml_file(tmp_path):
    path = tmp_path / "analyze.yaml"
    path.write_text("adapter: runs/a\noutput: out\nlimit: 5\nbatch-size: 2\n")
    args = load_settings(AnalyzeArgs, path, {"limit": 7, "cutoff": None})
    assert (args.adapter, args.output, args.limit, args.batch_size, args.cutoff) == (
        "runs/a",
        "out",
        7,
        2,
        256,
    )
    with pytest.raises(InvalidSetting, match=r"^--batch-size=0 is invalid"):
        load_settings(AnalyzeArgs, path, {"batch_size": 0})
