"""Property-based tests: the layer's fast paths equal the dense reference for any shape and routing, and
config validation rejects exactly the invalid values."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from comoe.config import ComoeConfig
from tests.helpers import dense_reference, grads, make_layer


@st.composite
def layer_cases(draw):
    n = draw(st.integers(1, 8))
    return dict(
        d_in=draw(st.integers(1, 33)),
        d_out=draw(st.integers(1, 33)),
        n=n,
        k=draw(st.integers(1, n)),
        r=draw(st.integers(1, 9)),
        strategy=draw(st.sampled_from(["blocks", "grouped", "auto"])),
        routing=draw(st.sampled_from(["topk", "soft"])),
        tokens=draw(st.integers(1, 24)),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=60, deadline=None)
@given(layer_cases())
def test_fast_path_equals_reference_for_any_shape(case):
    tokens, seed = case.pop("tokens"), case["seed"]
    layer = make_layer(**case)
    x = torch.randn(tokens, case["d_in"], generator=torch.Generator().manual_seed(seed), requires_grad=True)
    out, ref = layer(x), dense_reference(layer, x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    for fast, slow in zip(grads(layer, x, out), grads(layer, x, ref), strict=True):
        torch.testing.assert_close(fast.double(), slow.double(), rtol=1e-4, atol=1e-4)


values = st.one_of(
    st.integers(-3, 20),
    st.floats(-2, 2),
    st.just(float("nan")),
    st.sampled_from(["topk", "soft", "comoe", "x", ""]),
    st.none(),
    st.booleans(),
)


def _is_int(v, low):
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_number(v):
    return isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v)


def expected_valid(f):
    """An independent statement of the valid ranges documented on ComoeConfig's fields."""
    return (
        _is_int(f["num_experts"], 1)
        and _is_int(f["r"], 1)
        and _is_int(f["top_k"], 1)
        and f["top_k"] <= f["num_experts"]
        and _is_number(f["lora_alpha"])
        and f["lora_alpha"] > 0
        and _is_number(f["lora_dropout"])
        and 0 <= f["lora_dropout"] < 1
        and _is_number(f["temperature"])
        and f["temperature"] > 0
        and _is_number(f["contrastive_weight"])
        and f["contrastive_weight"] >= 0
        and f["routing"] in ("topk", "soft")
        and f["contrastive"] in ("none", "comoe", "moelora")
        and not (
            f["contrastive"] == "comoe" and (f["num_experts"] if f["routing"] == "soft" else f["top_k"]) < 2
        )
    )


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {
            "num_experts": values,
            "r": values,
            "top_k": values,
            "lora_alpha": values,
            "lora_dropout": values,
            "temperature": values,
            "contrastive_weight": values,
            "routing": values,
            "contrastive": st.sampled_from(["none", "comoe", "moelora", "simclr"]),
        }
    )
)
def test_validation_rejects_exactly_the_invalid_values(fields):
    try:
        ComoeConfig(**fields)
        accepted = True
    except ValueError:
        accepted = False
    assert accepted == expected_valid(fields), fields
