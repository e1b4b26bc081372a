"""comoe.validation: each check names the field, the value and the valid range in one line, refusing bools,
NaN, infinities and coercions."""

import math

import pytest

from comoe.validation import (
    InvalidSetting,
    check_choice,
    check_device,
    check_int,
    check_number,
    check_type,
    fail,
    reject_unknown,
)


def raised(check, *args, **kwargs) -> InvalidSetting:
    with pytest.raises(InvalidSetting) as info:
        check(*args, **kwargs)
    return info.value


def test_fail_raises_a_value_error_carrying_its_field():
    error = raised(fail, "top_k", 9, "1 <= top_k <= num_experts (4)")
    assert isinstance(error, ValueError) and error.field == "top_k"
    assert str(error) == "top_k=9 is invalid: expected 1 <= top_k <= num_experts (4)"


@pytest.mark.parametrize("value", [0, -1, True, False, 2.0, "3", None])
def test_check_int_refuses_small_values_bools_floats_and_strings(value):
    error = raised(check_int, "batch_size", value, low=1)
    assert str(error) == f"batch_size={value!r} is invalid: expected an integer >= 1"
    assert error.field == "batch_size"


def test_check_int_accepts_the_bound_and_above():
    for value in (0, 1, 10**12):
        check_int("seed", value, low=0)


@pytest.mark.parametrize(
    ("value", "kwargs", "expected"),
    [
        (0.0, dict(low=0.0, low_open=True), "a finite number > 0.0"),
        (-0.5, dict(low=0.0), "a finite number >= 0.0"),
        (1.0, dict(low=0.0, high=1.0), "a finite number >= 0.0 and < 1.0"),
        (math.nan, dict(low=0.0), "a finite number >= 0.0"),
        (math.inf, dict(low=0.0), "a finite number >= 0.0"),
        (True, dict(low=0.0), "a finite number >= 0.0"),
        ("0.1", dict(low=0.0), "a finite number >= 0.0"),
    ],
)
def test_check_number_states_the_range(value, kwargs, expected):
    error = raised(check_number, "lr", value, **kwargs)
    assert str(error) == f"lr={value!r} is invalid: expected {expected}"


def test_check_number_accepts_ints_and_the_closed_lower_bound():
    check_number("dropout", 0.0, low=0.0, high=1.0)
    check_number("dropout", 0.999, low=0.0, high=1.0)
    check_number("epochs", 3, low=0.0, low_open=True)
    check_number("weight", 1e300, low=0.0)


@pytest.mark.parametrize("value", ["auto", "cpu", "mps", "cuda", "cuda:0", "cuda:12"])
def test_check_device_accepts_device_names(value):
    check_device("device", value)


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "CPU", " cpu", "", None, 0])
def test_check_device_refuses_other_names(value):
    assert str(raised(check_device, "device", value)) == (
        f"device={value!r} is invalid: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
    )


def test_check_choice_lists_the_choices_in_order():
    check_choice("mode", "generate", ("loglik", "generate"))
    check_choice("mode", "b", iter(["a", "b"]))  # any iterable, read once
    error = raised(check_choice, "mode", "sample", ["loglik", "generate"])
    assert str(error) == "mode='sample' is invalid: expected one of 'loglik', 'generate'"
    assert error.field == "mode"


def test_reject_unknown_names_the_unknown_and_the_valid_fields():
    reject_unknown({"r": 1}, ["r", "top_k"], "adapter config")
    reject_unknown({}, [], "nothing")
    with pytest.raises(ValueError) as info:
        reject_unknown({"r": 1, "topk": 2, "alpha": 3}, ["top_k", "r"], "train.yaml")
    assert str(info.value) == "train.yaml: unknown fields ['alpha', 'topk']; valid fields: ['r', 'top_k']"
    assert not isinstance(info.value, InvalidSetting)


@pytest.mark.parametrize(
    ("value", "annotation"),
    [
        ("x", "str"),
        (None, "str | None"),
        (3, "int"),
        (3, "float"),
        (2.5, "float"),
        (False, "bool"),
        (["a", "b"], "list[str]"),
        ([], "list[str] | None"),
        ({"a": [1]}, "dict[str, Any]"),
        ({"a": "b"}, "dict[str, str]"),
    ],
)
def test_check_type_accepts_the_declared_type(value, annotation):
    check_type("field", value, annotation)


@pytest.mark.parametrize(
    ("value", "annotation", "wording"),
    [
        (None, "str", "a string"),
        (3, "str", "a string"),
        (True, "int", "an integer"),
        (2.0, "int", "an integer"),
        ("3", "int", "an integer"),
        (True, "float", "a number"),
        (math.inf, "float", "a finite number"),
        (math.nan, "float | None", "a finite number or null"),
        ("yes", "bool", "true or false"),
        (1, "bool", "true or false"),
        ("a,b", "list[str] | None", "a list of strings or null"),
        (["a", 1], "list[str]", "a list of strings"),
        ({1: "x"}, "dict[str, Any]", "a mapping"),
        ([1], "dict[str, Any]", "a mapping"),
        ({"a": 1}, "dict[str, str]", "a mapping of strings to strings"),
    ],
)
def test_check_type_refuses_coercions_naming_what_was_expected(value, annotation, wording):
    error = raised(check_type, "field", value, annotation)
    assert str(error) == f"field={value!r} is invalid: expected {wording}"
