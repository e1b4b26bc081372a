"""comoe.recipes.settings: the demo's settings and their checks."""

import pytest

from comoe.recipes.settings import DemoArgs
from comoe.settings import load_settings
from comoe.validation import InvalidSetting


def test_demo_defaults():
    args = DemoArgs()
    assert (args.output, args.max_steps, args.limit) == ("runs/demo", 120, 40)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"max_steps": 0}, "an integer >= 1"),
        ({"limit": 0}, "an integer >= 1"),
        ({"max_steps": 2.5}, "an integer"),  # a float is not coerced
        ({"limit": True}, "an integer"),  # nor a switch
    ],
)
def test_bad_values_name_the_field_and_range(values, expected):
    ((field, value),) = values.items()
    with pytest.raises(InvalidSetting) as info:
        DemoArgs(**values)
    assert str(info.value).startswith(f"{field}={value!r} is invalid: expected {expected}")
    assert info.value.field == field


def test_demo_settings_from_yaml_and_flags(tmp_path):
    path = tmp_path / "demo.yaml"
    path.write_text("max-steps: 10\nlimit: 3\n")
    args = load_settings(DemoArgs, path, {"limit": 5, "output": None})
    assert (args.output, args.max_steps, args.limit) == ("runs/demo", 10, 5)
    path.write_text("max_steps: 0\n")
    with pytest.raises(InvalidSetting, match=rf"^{path}: max_steps=0 is invalid"):
        load_settings(DemoArgs, path, {})
    path.write_text("steps: 10\n")
    with pytest.raises(
        ValueError, match=r"unknown fields \['steps'\]; valid fields: \['limit', 'max_steps', 'output'\]"
    ):
        load_settings(DemoArgs, path, {})
