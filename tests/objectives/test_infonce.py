"""The InfoNCE tails and the checks every objective shares, against loops and closed forms."""

import math

import pytest
import torch

from comoe.objectives.infonce import (
    activation_mask,
    check_topk,
    comoe_loss_from_anchor_cosines,
    supcon_loss,
    valid_mask,
    zero_with_grad,
)


def test_checks_name_the_shapes_and_values():
    with pytest.raises(ValueError, match="mask must have shape \\(4,\\), got \\(3,\\)"):
        valid_mask(torch.ones(3, dtype=torch.bool), 4, torch.device("cpu"))
    assert valid_mask(None, 3, torch.device("cpu")).tolist() == [True] * 3
    with pytest.raises(ValueError, match="k=5 activated experts exceeds the number of experts n=4"):
        check_topk(torch.zeros(2, 5, dtype=torch.long), 2, 4)
    with pytest.raises(ValueError, match="must not repeat an expert"):
        activation_mask(torch.tensor([[1, 1]]), 4)
    assert activation_mask(torch.tensor([[0, 2]]), 4).tolist() == [[True, False, True, False]]
    x = torch.randn(3, requires_grad=True)
    zero = zero_with_grad(x)
    assert float(zero) == 0.0 and zero.grad_fn is not None


def test_comoe_tail_equals_a_loop_over_anchors():
    g = torch.Generator().manual_seed(0)
    tokens, n, k, tau = 5, 5, 2, 0.5
    topk = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(tokens)])
    cosines = torch.rand(tokens, k, n, generator=g, dtype=torch.float64) * 2 - 1
    expected = 0.0
    for t in range(tokens):
        active = set(topk[t].tolist())
        for slot, anchor in enumerate(topk[t].tolist()):
            s = [math.exp(float(cosines[t, slot, j]) / tau) for j in range(n)]
            positives = sum(s[j] for j in active - {anchor})
            everything = sum(s[j] for j in range(n) if j != anchor)
            expected += -math.log(positives / everything) / k
    got = comoe_loss_from_anchor_cosines(cosines, topk, tau)
    assert float(got) == pytest.approx(expected / tokens, rel=1e-10)


def test_supcon_tail_equals_a_loop():
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    cosines = torch.rand(6, 6, generator=g, dtype=torch.float64)
    cosines = (cosines + cosines.t()) / 2
    tau, total, counted = 0.3, 0.0, 0
    for u in range(6):
        positives = [p for p in range(6) if p != u and labels[p] == labels[u]]
        if not positives:
            continue
        log_den = math.log(sum(math.exp(float(cosines[u, a]) / tau) for a in range(6) if a != u))
        total += -sum(float(cosines[u, p]) / tau - log_den for p in positives) / len(positives)
        counted += 1
    assert float(supcon_loss(cosines, labels, tau)) == pytest.approx(total / counted, rel=1e-10)
