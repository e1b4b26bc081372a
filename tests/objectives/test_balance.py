"""The balance objective's fast path (no host reads, padding weighted out) against the plain reference."""

import pytest
import torch

from comoe.config import ComoeConfig
from comoe.moe.record import LayerRecord
from comoe.moe.routing import route
from comoe.moe.threshold import threshold_route
from comoe.objectives import reference
from comoe.objectives.balance import balance_batched, balance_loss, global_expert_fraction, load_balance_loss


def case(tokens=30, n=6, k=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, n, generator=g, dtype=dtype, requires_grad=True)
    mask = torch.rand(tokens, generator=g) > 0.3
    return logits, route(logits, k), mask


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize(("n", "k"), [(4, 1), (6, 2), (8, 3)])
def test_fast_balance_equals_the_reference_in_value_and_gradient(n, k, use_mask):
    logits, routing, mask = case(n=n, k=k)
    mask = mask if use_mask else None
    fast = load_balance_loss(routing.probs, routing.indices, mask)
    plain = reference.load_balance_loss(routing.probs, routing.indices, mask)
    torch.testing.assert_close(fast, plain)
    grads = [torch.autograd.grad(loss, logits, retain_graph=True)[0] for loss in (fast, plain)]
    torch.testing.assert_close(grads[0], grads[1])


def test_padding_may_hold_any_index_and_a_given_fraction_replaces_the_count():
    logits, routing, mask = case()
    indices = routing.indices.clone()
    indices[~mask] = 99  # padding rows: out of range, weighted out
    clean = load_balance_loss(routing.probs, routing.indices, mask)
    torch.testing.assert_close(load_balance_loss(routing.probs, indices, mask), clean)
    uniform = torch.full((6,), 1 / 6, dtype=torch.float64)
    mean_prob = routing.probs[mask].mean(0)
    torch.testing.assert_close(load_balance_loss(routing.probs, routing.indices, mask, uniform), 6 * (uniform * mean_prob).sum())


def test_half_precision_is_computed_in_float32():
    logits, routing, _ = case(dtype=torch.float32)
    half = load_balance_loss(routing.probs.half(), routing.indices)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, load_balance_loss(routing.probs, routing.indices), atol=1e-3, rtol=1e-3)


def test_the_layer_objective_reads_the_record_mask_and_one_process_counts_locally():
    logits, routing, mask = case()
    record = LayerRecord(routing, torch.zeros(30, 6, 2), mask, torch.zeros(6, 2, 3))
    assert global_expert_fraction(record) is None  # no process group
    for scope in ("local", "global"):
        value = balance_loss(record, ComoeConfig.preset("mixlora", num_experts=6, balance_scope=scope))
        torch.testing.assert_close(value, reference.load_balance_loss(routing.probs, routing.indices, mask))


def test_a_variable_number_of_active_experts_counts_only_the_active_ones():
    """AdaMoLE's threshold routing (the k = n layout, Routing.active): f_i is expert i's share of the really
    active (token, expert) pairs over real tokens, written out as a loop; batched over layers as per layer."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(25, 5, generator=g, dtype=torch.float64, requires_grad=True)
    routing = threshold_route(logits, 3 * torch.randn(25, 1, generator=g))
    mask = torch.rand(25, generator=g) > 0.3
    counts = torch.zeros(5, dtype=torch.float64)
    for t in range(25):
        for i in range(5):
            counts[i] += float(mask[t] and routing.active[t, i])
    fraction = counts / counts.sum()
    expected = 5 * (fraction * routing.probs[mask].double().mean(0)).sum()
    record = LayerRecord(routing, torch.zeros(25, 5, 1), mask, torch.zeros(5, 1, 3))
    value = balance_loss(record, ComoeConfig(routing="threshold", num_experts=5))
    torch.testing.assert_close(value.double(), expected)
    assert not torch.allclose(fraction, routing.probs[mask].double().mean(0).detach())  # not the mass
    batched = balance_batched([record, record], ComoeConfig(routing="threshold", num_experts=5))
    torch.testing.assert_close(batched, torch.stack([value, value]))
    grads = [torch.autograd.grad(loss, logits, retain_graph=True)[0] for loss in (value, expected)]
    torch.testing.assert_close(grads[0].double(), grads[1])
