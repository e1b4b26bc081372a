"""The one kernel boundary of expert compute: a grouped matmul over rows sorted by expert.

Everything above this module (routing, gathering, gating, scattering back) is plain PyTorch; a faster
kernel for a device (a Triton ScatterMoE kernel, a vendor grouped GEMM) replaces `grouped_matmul` here and
nothing else changes. Tested against one matmul per group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_matmul(
    a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """Rows of `a` grouped by expert (counts/offsets) times that expert's matrix b[g]: [M, K] x [G, K, N].

    One grouped_mm where its 16-byte row alignment holds; otherwise one matmul per group.
    """
    if all(size * a.element_size() % 16 == 0 for size in (a.shape[-1], b.shape[-1])):
        return GroupedMatmul.apply(a, b, offsets)
    return torch.cat([rows @ b[g] for g, rows in enumerate(a.split(counts.tolist()))])


class GroupedMatmul(torch.autograd.Function):
    """out[rows of group g] = a[rows of group g] @ b[g], with a backward that also runs on CPU.

    grouped_mm's own autograd fails on CPU for non-contiguous output gradients, so both gradients are
    written as grouped matmuls here: da = g @ b^T per group, db[g] = a_g^T @ g_g (2D x 2D form).
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b, offsets)
        return F.grouped_mm(a, b, offs=offsets)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        a, b, offsets = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_a = F.grouped_mm(grad_out, b.transpose(1, 2), offs=offsets) if ctx.needs_input_grad[0] else None
        grad_b = None
        if ctx.needs_input_grad[1]:
            grad_b = F.grouped_mm(a.t(), grad_out, offs=offsets)
            empty = torch.diff(offsets, prepend=offsets.new_zeros(1)) == 0
            grad_b = grad_b.masked_fill(empty.view(-1, 1, 1), 0)  # groups with no rows get no gradient
        return grad_a, grad_b, None
