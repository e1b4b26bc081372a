"""Tests for the reference losses against explicit Python-loop definitions and closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from comoe.objectives.reference import (
    comoe_loss,
    cosine_similarity_matrix,
    load_balance_loss,
    moelora_loss,
)

# --------------------------------------------------------------------------------------------- helpers


def _cos(u: list[float], v: list[float]) -> float:
    nu = max(math.sqrt(sum(a * a for a in u)), 1e-8)
    nv = max(math.sqrt(sum(b * b for b in v)), 1e-8)
    return sum(a * b for a, b in zip(u, v, strict=True)) / (nu * nv)


def _random_topk(num_tokens: int, n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(num_tokens)])


def _case(num_tokens: int, n: int, k: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, n, d, generator=g, dtype=torch.float64)
    return x, _random_topk(num_tokens, n, k, g)


def _comoe_loop(
    x: torch.Tensor,
    topk: torch.Tensor,
    tau: float,
    mask: list[bool] | None = None,
    anchors: list[list[int]] | None = None,
    negatives: list[list[int]] | None = None,
) -> float:
    """Literal per-token, per-anchor CoMoE loss; anchors/negatives override the defaults per token."""
    e, tk = x.tolist(), topk.tolist()
    n = len(e[0])
    token_losses = []
    for t in range(len(e)):
        if mask is not None and not mask[t]:
            continue
        active = tk[t]
        neg = negatives[t] if negatives is not None else [j for j in range(n) if j not in active]
        token_anchors = anchors[t] if anchors is not None else active
        per_anchor = []
        for a in token_anchors:
            pos = [j for j in active if j != a]
            num = sum(math.exp(_cos(e[t][a], e[t][p]) / tau) for p in pos)
            den = num + sum(math.exp(_cos(e[t][a], e[t][j]) / tau) for j in neg)
            per_anchor.append(-math.log(num / den))
        token_losses.append(sum(per_anchor) / len(per_anchor))
    return sum(token_losses) / len(token_losses)


def _moelora_loop(x: torch.Tensor, topk: torch.Tensor, tau: float, tokens: list[int] | None = None) -> float:
    """Literal SupCon over (token, activated expert) items labelled by expert id."""
    e, tk = x.tolist(), topk.tolist()
    tokens = list(range(len(e))) if tokens is None else tokens
    items = [(e[t][i], i) for t in tokens for i in tk[t]]
    losses = []
    for u, (vu, lu) in enumerate(items):
        others = [a for a in range(len(items)) if a != u]
        pos = [p for p in others if items[p][1] == lu]
        if not pos:
            continue
        den = sum(math.exp(_cos(vu, items[a][0]) / tau) for a in others)
        terms = [math.log(math.exp(_cos(vu, items[p][0]) / tau) / den) for p in pos]
        losses.append(-sum(terms) / len(pos))
    return sum(losses) / len(losses)


# ------------------------------------------------------------------------------------------ cosine


def test_cosine_similarity_matrix_values_and_zero_rows() -> None:
    x = torch.tensor([[3.0, 4.0], [0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    sim = cosine_similarity_matrix(x)
    expected = torch.tensor([[1.0, 0.8, 0.0], [0.8, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(sim, expected)
    y = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(cosine_similarity_matrix(x, y), torch.tensor([[0.6], [0.0], [0.0]]).double())


# ------------------------------------------------------------------------------------ load balance


@pytest.mark.parametrize(("n", "k"), [(4, 1), (4, 2), (8, 2)])
def test_load_balance_uniform_is_one(n: int, k: int) -> None:
    # Each expert appears equally often across the tokens and probabilities are uniform.
    topk = torch.stack([(torch.arange(k) + t) % n for t in range(n)])
    probs = torch.full((n, n), 1.0 / n, dtype=torch.float64)
    assert load_balance_loss(probs, topk).item() == pytest.approx(1.0)


def test_load_balance_collapse_is_n() -> None:
    n, num_tokens = 5, 7
    probs = torch.zeros(num_tokens, n, dtype=torch.float64)
    probs[:, 2] = 1.0
    topk = torch.full((num_tokens, 1), 2)
    assert load_balance_loss(probs, topk).item() == pytest.approx(float(n))


def test_load_balance_hand_example_and_gradient_through_probs_only() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], dtype=torch.float64, requires_grad=True)
    topk = torch.tensor([[0, 1], [1, 2]])
    # f = [1, 2, 1] / 4, P = [0.3, 0.45, 0.25] -> 3 * (0.075 + 0.225 + 0.0625)
    loss = load_balance_loss(probs, topk)
    assert loss.item() == pytest.approx(1.0875)
    loss.backward()
    # d/dprobs[t, i] = n * f_i / T: f is a constant count.
    expected = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64).repeat(2, 1) * 3 / 2
    torch.testing.assert_close(probs.grad, expected)


def test_load_balance_mask_equals_slicing() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(9, 6, generator=g, dtype=torch.float64), dim=-1)
    topk = probs.topk(2, dim=-1).indices
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 0], dtype=torch.bool)
    masked = load_balance_loss(probs, topk, mask)
    torch.testing.assert_close(masked, load_balance_loss(probs[mask], topk[mask]))
    assert masked.item() != pytest.approx(load_balance_loss(probs, topk).item())


def test_load_balance_empty_mask_is_grad_connected_zero() -> None:
    probs = torch.rand(3, 4, requires_grad=True)
    loss = load_balance_loss(probs, torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(probs.grad, torch.zeros(3, 4))


# ------------------------------------------------------------------------------------------- CoMoE


@pytest.mark.parametrize(("n", "k"), [(2, 2), (4, 2), (4, 3), (8, 2), (8, 3)])
@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_comoe_all_anchors_matches_loop(n: int, k: int, tau: float) -> None:
    x, topk = _case(6, n, k, 5, seed=n * 10 + k)
    expected = _comoe_loop(x, topk, tau)
    assert comoe_loss(x, topk, tau).item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_comoe_n_equals_k_is_zero() -> None:
    x, topk = _case(4, 3, 3, 4, seed=1)
    assert comoe_loss(x, topk, 0.5).item() == 0.0


def test_comoe_mask_matches_loop_and_slicing() -> None:
    x, topk = _case(7, 6, 2, 4, seed=2)
    mask = [True, False, True, False, False, True, True]
    mt = torch.tensor(mask)
    topk_garbage = topk.clone()
    topk_garbage[~mt] = -1  # padding tokens may hold anything
    got = comoe_loss(x, topk_garbage, 0.3, mask=mt)
    assert got.item() == pytest.approx(_comoe_loop(x, topk, 0.3, mask=mask), rel=1e-10)
    torch.testing.assert_close(got, comoe_loss(x[mt], topk[mt], 0.3))


@pytest.mark.parametrize(("n", "k"), [(4, 2), (8, 3)])
def test_comoe_random_anchor_matches_loop_with_same_draw(n: int, k: int) -> None:
    num_tokens = 8
    x, topk = _case(num_tokens, n, k, 5, seed=3)
    got = comoe_loss(x, topk, 0.2, anchor="random", generator=torch.Generator().manual_seed(11))
    slots = torch.randint(k, (num_tokens,), generator=torch.Generator().manual_seed(11))
    anchors = [[topk[t, slots[t]].item()] for t in range(num_tokens)]
    assert got.item() == pytest.approx(_comoe_loop(x, topk, 0.2, anchors=anchors), rel=1e-10)
    assert got.item() != pytest.approx(_comoe_loop(x, topk, 0.2))


def test_comoe_random_anchor_with_mask_draws_over_all_tokens() -> None:
    x, topk = _case(6, 5, 2, 3, seed=4)
    mask = [False, True, True, False, True, True]
    got = comoe_loss(
        x, topk, 0.5, anchor="random", mask=torch.tensor(mask), generator=torch.Generator().manual_seed(5)
    )
    slots = torch.randint(2, (6,), generator=torch.Generator().manual_seed(5))
    anchors = [[topk[t, slots[t]].item()] for t in range(6)]
    assert got.item() == pytest.approx(_comoe_loop(x, topk, 0.5, mask=mask, anchors=anchors), rel=1e-10)


def test_comoe_num_negatives_full_equals_all() -> None:
    x, topk = _case(6, 8, 3, 4, seed=5)
    full = comoe_loss(x, topk, 0.4)
    torch.testing.assert_close(comoe_loss(x, topk, 0.4, num_negatives=5), full)
    torch.testing.assert_close(comoe_loss(x, topk, 0.4, num_negatives=50), full)


@pytest.mark.parametrize("anchor", ["all", "random"])
def test_comoe_num_negatives_sampled_matches_loop_with_same_draw(anchor: str) -> None:
    num_tokens, n, k, m = 7, 8, 2, 3
    x, topk = _case(num_tokens, n, k, 4, seed=6)
    got = comoe_loss(x, topk, 0.4, anchor=anchor, generator=torch.Generator().manual_seed(9), num_negatives=m)
    g = torch.Generator().manual_seed(9)
    anchors = None
    if anchor == "random":
        slots = torch.randint(k, (num_tokens,), generator=g)
        anchors = [[topk[t, slots[t]].item()] for t in range(num_tokens)]
    keys = torch.rand((num_tokens, n - k), generator=g)
    negatives = []
    for t in range(num_tokens):
        inactive = [j for j in range(n) if j not in topk[t].tolist()]
        negatives.append([inactive[p] for p in keys[t].argsort()[:m].tolist()])
    assert got.item() == pytest.approx(
        _comoe_loop(x, topk, 0.4, anchors=anchors, negatives=negatives), rel=1e-10
    )
    if anchor == "all":
        assert got.item() != pytest.approx(comoe_loss(x, topk, 0.4).item())


@pytest.mark.parametrize(("n", "k"), [(4, 2), (8, 3), (5, 5)])
def test_comoe_identical_outputs_closed_form(n: int, k: int) -> None:
    x = torch.randn(1, 1, 6, dtype=torch.float64).expand(5, n, 6).clone()
    topk = _random_topk(5, n, k, torch.Generator().manual_seed(0))
    # All s_j equal: loss = -log(|P| / |P u N|) = -log((k-1)/(n-1)), for any temperature.
    for tau in (0.07, 1.0):
        assert comoe_loss(x, topk, tau).item() == pytest.approx(-math.log((k - 1) / (n - 1)), abs=1e-12)
    if n > k:
        got = comoe_loss(x, topk, 0.5, num_negatives=1, generator=torch.Generator().manual_seed(0))
        assert got.item() == pytest.approx(-math.log((k - 1) / k))


def test_comoe_k_below_two_raises() -> None:
    x, topk = _case(3, 4, 1, 2, seed=0)
    with pytest.raises(ValueError, match="k=1"):
        comoe_loss(x, topk, 0.5)


def test_comoe_rejects_duplicate_experts_and_bad_anchor() -> None:
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="repeat"):
        comoe_loss(x, torch.tensor([[0, 0], [1, 2]]), 0.5)
    with pytest.raises(ValueError, match="anchor"):
        comoe_loss(x, torch.tensor([[0, 1], [1, 2]]), 0.5, anchor="first")


def test_comoe_empty_mask_is_grad_connected_zero() -> None:
    x = torch.randn(3, 4, 2, requires_grad=True)
    loss = comoe_loss(x, torch.tensor([[0, 1]] * 3), 0.5, mask=torch.zeros(3, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_comoe_gradient_finite_and_gradcheck() -> None:
    x, topk = _case(16, 8, 2, 16, seed=7)
    x = (x * 10).float().requires_grad_()
    comoe_loss(x, topk, 0.05, num_negatives=3, generator=torch.Generator().manual_seed(0)).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

    xs, tks = _case(3, 4, 2, 3, seed=8)
    xs.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: comoe_loss(t, tks, 0.5), (xs,))
    assert torch.autograd.gradcheck(
        lambda t: comoe_loss(t, tks, 0.5, anchor="random", generator=torch.Generator().manual_seed(1)), (xs,)
    )


def test_comoe_half_precision_upcast() -> None:
    x, topk = _case(5, 4, 2, 8, seed=9)
    got = comoe_loss(x.bfloat16(), topk, 0.5)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(comoe_loss(x.bfloat16().double(), topk, 0.5).item(), rel=1e-5)


# ----------------------------------------------------------------------------------------- MoELoRA


@pytest.mark.parametrize(("n", "k", "num_tokens"), [(2, 1, 5), (4, 2, 6), (8, 3, 5), (3, 3, 4)])
@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_moelora_matches_loop(n: int, k: int, num_tokens: int, tau: float) -> None:
    x, topk = _case(num_tokens, n, k, 5, seed=20 + n + k)
    got = moelora_loss(x, topk, tau)
    assert got.item() == pytest.approx(_moelora_loop(x, topk, tau), rel=1e-10)


def test_moelora_mask_matches_loop() -> None:
    x, topk = _case(7, 5, 2, 4, seed=30)
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    got = moelora_loss(x, topk, 0.3, mask=mask)
    tokens = [t for t in range(7) if mask[t]]
    assert got.item() == pytest.approx(_moelora_loop(x, topk, 0.3, tokens=tokens), rel=1e-10)


def test_moelora_orthogonal_clusters_closed_form() -> None:
    # Expert i always outputs basis vector e_i: same-label cos = 1, cross-label cos = 0.
    n, tau = 4, 0.1
    topk = torch.tensor([[0, 1], [0, 2], [1, 2], [0, 3], [1, 0]])
    x = torch.eye(n, dtype=torch.float64).repeat(topk.shape[0], 1, 1) * 3.0
    labels = topk.flatten().tolist()
    num_items = len(labels)
    counts = {i: labels.count(i) for i in set(labels)}
    # loss_u = log((c-1) e^{1/tau} + (N - c)) - 1/tau for items whose expert c appears c >= 2 times.
    per_item = [
        math.log((counts[i] - 1) * math.exp(1 / tau) + num_items - counts[i]) - 1 / tau
        for i in labels
        if counts[i] >= 2
    ]
    expected = sum(per_item) / len(per_item)
    got = moelora_loss(x, topk, tau)
    assert got.item() == pytest.approx(expected, rel=1e-10)
    # Near its lower bound mean(log(c - 1)): the clusters are almost perfectly separated.
    lower = sum(math.log(counts[i] - 1) for i in labels if counts[i] >= 2) / len(per_item)
    assert lower <= got.item() < lower + 1e-3
    assert got.item() < moelora_loss(torch.randn_like(x), topk, tau).item()


def test_moelora_max_tokens_reproducible_and_matches_loop() -> None:
    x, topk = _case(10, 4, 2, 3, seed=40)
    mask = torch.tensor([1, 1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    a = moelora_loss(x, topk, 0.5, mask=mask, max_tokens=4, generator=torch.Generator().manual_seed(3))
    b = moelora_loss(x, topk, 0.5, mask=mask, max_tokens=4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    keys = torch.rand(10, generator=torch.Generator().manual_seed(3)) - mask.float()
    keep = sorted(keys.argsort()[:4].tolist())  # the 4 smallest keys: real tokens (keys < 0) first
    assert all(mask[keep])
    assert a.item() == pytest.approx(_moelora_loop(x, topk, 0.5, tokens=keep), rel=1e-10)
    # Not subsampling when max_tokens >= valid tokens.
    full = moelora_loss(x, topk, 0.5, mask=mask)
    torch.testing.assert_close(moelora_loss(x, topk, 0.5, mask=mask, max_tokens=8), full)
    assert a.item() != pytest.approx(full.item())


def test_moelora_no_positives_is_grad_connected_zero() -> None:
    # Every expert is used by exactly one token: no item has a positive.
    x = torch.randn(2, 4, 3, requires_grad=True)
    loss = moelora_loss(x, torch.tensor([[0, 1], [2, 3]]), 0.5)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    empty = moelora_loss(x, torch.tensor([[0, 1], [0, 1]]), 0.5, mask=torch.zeros(2, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.grad_fn is not None


def test_moelora_items_without_positives_are_excluded() -> None:
    # Expert 3 appears once; its item must not enter the mean (the loop skips it too).
    x, _ = _case(3, 4, 2, 4, seed=50)
    topk = torch.tensor([[0, 1], [0, 2], [1, 3]])
    assert moelora_loss(x, topk, 0.5).item() == pytest.approx(_moelora_loop(x, topk, 0.5), rel=1e-10)


def test_moelora_gradcheck() -> None:
    x, topk = _case(3, 3, 2, 3, seed=60)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: moelora_loss(t, topk, 0.5), (x,))
