"""comoe.evaluation.settings: EvalArgs and GenerateArgs defaults, and each bad value named with its range
(as a field, and as the flag that gave it)."""

import dataclasses

import pytest

from comoe.evaluation.settings import (
    GENERATED_ROW,
    MODES,
    SPLITS,
    CompareArgs,
    EvalArgs,
    GenerateArgs,
    compare_sides,
)
from comoe.settings import load_settings
from comoe.validation import InvalidSetting


def test_eval_defaults_score_the_base_model_on_the_test_split_by_loglikelihood():
    args = EvalArgs()
    # model None: the base the adapter records, else smollm2-135m (comoe.models.auto.base_model_name)
    assert (args.model, args.adapter, args.mode, args.split) == (None, None, "loglik", "test")
    assert (args.load_in_4bit, args.load_in_8bit) == (None, None)  # None: as the adapter was trained
    assert (args.batch_size, args.limit, args.max_new_tokens, args.seed, args.output) == (
        8,
        None,
        None,
        0,
        None,
    )
    assert (args.dtype, args.device, args.format, args.template, args.columns) == (
        "float32",
        "auto",
        "auto",
        "auto",
        {},
    )
    assert MODES == ("loglik", "generate") and SPLITS == ("test", "validation")
    assert EvalArgs().columns is not EvalArgs().columns  # a fresh mapping per instance


@pytest.mark.parametrize(
    ("values", "field", "message"),
    [
        ({"split": "train"}, "split", "split='train' is invalid: expected one of 'test', 'validation'"),
        ({"mode": "greedy"}, "mode", "mode='greedy' is invalid: expected one of 'loglik', 'generate'"),
        ({"batch_size": 0}, "batch_size", "batch_size=0 is invalid: expected an integer >= 1"),
        ({"limit": -2}, "limit", "limit=-2 is invalid: expected an integer >= 1"),
        ({"max_new_tokens": 0}, "max_new_tokens", "max_new_tokens=0 is invalid: expected an integer >= 1"),
        ({"format": "a b"}, "format", "format='a b' is invalid: expected auto or the name of a registered record format"),
        ({"template": "llama"}, "template", "template='llama' is invalid"),
        ({"device": "tpu"}, "device", "device='tpu' is invalid"),
    ],
)
def test_eval_refuses_bad_values_naming_the_field(values, field, message):
    with pytest.raises(InvalidSetting) as info:
        EvalArgs(**values)
    assert info.value.field == field and str(info.value).startswith(message)


def test_eval_data_is_exclusive_with_llm_adapters_tasks_and_never_empty():
    assert EvalArgs(data=["mine=a.jsonl"]).data == ["mine=a.jsonl"]
    with pytest.raises(ValueError, match="data is exclusive with data_dir/tasks"):
        EvalArgs(data=["a.jsonl"], tasks=["boolq"])
    with pytest.raises(ValueError, match="data is exclusive with data_dir/tasks"):
        EvalArgs(data=["a.jsonl"], data_dir="LLM-Adapters")
    with pytest.raises(ValueError, match="data: give at least one"):
        EvalArgs(data=[])


def test_a_bad_flag_is_named_as_the_flag():
    with pytest.raises(InvalidSetting, match=r"^--max-new-tokens=0 is invalid: expected an integer >= 1$"):
        load_settings(EvalArgs, None, {"max_new_tokens": 0})
    assert load_settings(EvalArgs, None, {"mode": "generate", "limit": None}).mode == "generate"


def test_generate_defaults_and_exactly_one_prompt_source():
    args = GenerateArgs(prompt="Hi")
    assert (args.prompts, args.template, args.max_new_tokens, args.batch_size, args.output) == (
        None,
        "auto",
        128,
        8,
        None,
    )
    assert GenerateArgs(prompts="p.txt").prompt is None
    for values in ({}, {"prompt": "Hi", "prompts": "p.txt"}):
        with pytest.raises(ValueError, match="^give exactly one of --prompt TEXT or --prompts FILE$"):
            GenerateArgs(**values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens=0 is invalid: expected an integer >= 1"),
        ({"max_new_tokens": "12"}, "max_new_tokens='12' is invalid: expected an integer"),  # no coercion
        ({"batch_size": 2.0}, "batch_size=2.0 is invalid: expected an integer"),
        (
            {"template": "alpaca2"},
            "template='alpaca2' is invalid: expected one of 'auto', 'alpaca', 'chat', 'none'",
        ),
        ({"prompt": 3}, "prompt=3 is invalid: expected a string or null"),
    ],
)
def test_generate_refuses_bad_values(values, message):
    with pytest.raises(InvalidSetting, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        GenerateArgs(**{"prompt": "Hi", **values})


def test_every_eval_and_generate_field_has_help():
    for settings in (EvalArgs, GenerateArgs):
        for spec in dataclasses.fields(settings):
            assert spec.metadata.get("help"), (settings.__name__, spec.name)


def test_eval_takes_one_adapter_or_several():
    assert EvalArgs(adapter="a").adapter == "a" and EvalArgs(adapter="a").adapters == ["a"]
    assert EvalArgs(adapter=["a"]).adapter == "a"  # --adapter given once is that folder
    assert EvalArgs(adapter=["a", "b"]).adapters == ["a", "b"] and EvalArgs().adapters == []
    assert EvalArgs(adapter=["a", "b"], with_base=True).with_base
    flags = load_settings(EvalArgs, None, {"adapter": ["x", "y"], "with_base": True})
    assert flags.adapters == ["x", "y"] and flags.with_base
    with pytest.raises(ValueError, match="--adapter a is given twice"):
        EvalArgs(adapter=["a", "b", "a"])
    with pytest.raises(InvalidSetting, match="adapter=\\['a', ''\\] is invalid: expected a non-empty string or a list"):
        EvalArgs(adapter=["a", ""])
    with pytest.raises(InvalidSetting, match="adapter='' is invalid: expected a non-empty string"):
        EvalArgs(adapter=[""])
    with pytest.raises(InvalidSetting, match="adapter=3 is invalid: expected a string or a list of strings"):
        EvalArgs(adapter=3)


def test_compare_settings_read_sides_and_refuse_fewer_than_two():
    args = CompareArgs(reports=["a.json", "b0.json, b1.json"])
    assert compare_sides(args.reports) == [["a.json"], ["b0.json", "b1.json"]]
    assert (args.labels, args.samples, args.seed, args.output) == (None, 2000, 0, None)
    with pytest.raises(ValueError, match="give at least two sides to compare .*, got 1: a.json"):
        CompareArgs(reports=["a.json"])
    with pytest.raises(InvalidSetting, match=r"labels=\['x'\] is invalid: expected one label per side \(2\)"):
        CompareArgs(reports=["a.json", "b.json"], labels=["x"])
    with pytest.raises(InvalidSetting, match="samples=10 is invalid: expected an integer >= 100"):
        CompareArgs(reports=["a.json", "b.json"], samples=10)
    for spec in dataclasses.fields(CompareArgs):
        assert spec.metadata.get("help"), spec.name


def test_generate_help_names_every_key_of_its_rows():
    help_text = next(f for f in dataclasses.fields(GenerateArgs) if f.name == "output").metadata["help"]
    assert help_text.startswith("write JSONL rows {prompt, response, truncated} here")
    assert GENERATED_ROW == ("prompt", "response", "truncated")  # run_generate builds its rows from these
