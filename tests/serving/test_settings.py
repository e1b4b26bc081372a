"""`comoe serve`'s settings: flags and their refusals (one line naming the field)."""

import pytest

from comoe.serving.settings import ServeArgs
from comoe.validation import InvalidSetting


def test_defaults_listen_on_loopback():
    args = ServeArgs(adapter="runs/x/adapter")
    assert (args.host, args.port, args.dtype, args.tensor_parallel_size) == ("127.0.0.1", 8000, "float32", 1)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({}, "--adapter"),
        ({"adapter": "a", "port": 0}, "port=0"),
        ({"adapter": "a", "port": 70000}, "port=70000"),
        ({"adapter": "a", "dtype": "int8"}, "dtype='int8'"),
        ({"adapter": "a", "tensor_parallel_size": 0}, "tensor_parallel_size=0"),
        ({"adapter": "a", "kv_cache_gib": 0.0}, "kv_cache_gib=0.0"),
        ({"adapter": "a", "max_model_len": 0}, "max_model_len=0"),
    ],
)
def test_bad_settings_name_the_field(fields, named):
    with pytest.raises((ValueError, InvalidSetting), match=named):
        ServeArgs(**fields)
