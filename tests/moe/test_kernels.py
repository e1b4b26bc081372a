"""comoe.moe.kernels: grouped_matmul picks grouped_mm where rows are 16-byte aligned and a per-group loop
otherwise, and GroupedMatmul's own backward equals autograd through one matmul per group."""

import pytest
import torch

from comoe.moe import kernels
from comoe.moe.kernels import GroupedMatmul, grouped_matmul


def groups(counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    counts_t = torch.tensor(counts)
    return counts_t, torch.cumsum(counts_t, 0).to(torch.int32)


def loop_reference(a: torch.Tensor, b: torch.Tensor, counts: list[int]) -> torch.Tensor:
    out, start = [], 0
    for g, count in enumerate(counts):
        out.append(a[start : start + count] @ b[g])
        start += count
    return torch.cat(out)


def inputs(rows: int, k_dim: int, n_dim: int, num_groups: int, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, k_dim, generator=g).to(dtype).requires_grad_(True)
    b = torch.randn(num_groups, k_dim, n_dim, generator=g).to(dtype).requires_grad_(True)
    return a, b


@pytest.mark.parametrize(
    ("k_dim", "n_dim", "dtype", "grouped"),
    [
        (8, 4, torch.float32, True),  # 32- and 16-byte rows
        (6, 4, torch.float32, False),  # 24-byte rows of a
        (8, 6, torch.float32, False),  # 24-byte rows of b
        (8, 16, torch.bfloat16, True),  # 16- and 32-byte rows
        (4, 8, torch.bfloat16, False),  # 8-byte rows of a
    ],
)
def test_the_alignment_chooses_the_path_and_both_equal_the_loop(monkeypatch, k_dim, n_dim, dtype, grouped):
    calls = []
    real = GroupedMatmul.apply

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(kernels.GroupedMatmul, "apply", counting)
    counts = [3, 0, 5, 1]
    a, b = inputs(9, k_dim, n_dim, 4, dtype)
    out = grouped_matmul(a, b, *groups(counts))
    assert (len(calls) == 1) == grouped
    assert out.dtype == dtype and out.shape == (9, n_dim)
    reference = loop_reference(a.float(), b.float(), counts)
    tolerance = dict(rtol=2e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.float(), reference, **tolerance)


@pytest.mark.parametrize("counts", [[4, 0, 3, 5], [0, 0, 12, 0], [12], [0, 6, 6, 0]])
def test_grouped_backward_equals_autograd_through_the_loop_with_a_non_contiguous_gradient(counts):
    rows = sum(counts)
    a, b = inputs(rows, 8, 4, len(counts), seed=len(counts))
    out = GroupedMatmul.apply(a, b, groups(counts)[1])
    reference = loop_reference(a, b, counts)
    torch.testing.assert_close(out, reference)
    # a gradient that is a transposed view: grouped_mm's own backward fails on CPU for this
    weight = torch.randn(4, rows, generator=torch.Generator().manual_seed(1)).t()
    assert not weight.is_contiguous()
    got = torch.autograd.grad(out, (a, b), weight)
    expected = torch.autograd.grad(reference, (a, b), weight)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    for g, count in enumerate(counts):
        if count == 0:  # no rows: exactly no gradient
            assert torch.equal(got[1][g], torch.zeros(8, 4))
        else:
            assert got[1][g].abs().sum() > 0


def test_backward_computes_only_the_gradients_that_are_needed(monkeypatch):
    calls = []
    real = kernels.F.grouped_mm

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels.F, "grouped_mm", counting)
    counts = [2, 3]
    a, b = inputs(5, 8, 4, 2)
    frozen_b = b.detach()
    out = GroupedMatmul.apply(a, frozen_b, groups(counts)[1])
    calls.clear()
    out.sum().backward()
    assert calls == [(5, 4)]  # grad_out @ b^T only
    torch.testing.assert_close(a.grad, loop_grad_a(frozen_b, counts))
    frozen_a = a.detach()
    out = GroupedMatmul.apply(frozen_a, b, groups(counts)[1])
    calls.clear()
    (grad_b,) = torch.autograd.grad(out.sum(), (b,))
    assert calls == [(8, 5)]  # a^T @ grad_out only
    torch.testing.assert_close(grad_b[0], frozen_a[:2].t() @ torch.ones(2, 4))
    torch.testing.assert_close(grad_b[1], frozen_a[2:].t() @ torch.ones(3, 4))


def loop_grad_a(b: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """d(sum of a @ b[g])/da for each row: the row sums of b[g] (ones times b[g]^T)."""
    rows = [b[g].sum(1) for g, count in enumerate(counts) for _ in range(count)]
    return torch.stack(rows)
