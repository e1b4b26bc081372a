"""Expert compute: sum_{i active} gate_i * scaling * B_i A_i x for every token, without a loop over tokens.

Every expert's down-projection z_i = A_i x is computed for all experts in one matmul ([T, n*r]; the
contrastive objectives need all of them anyway). The up-projection then has two exact strategies:

- blocks: scale z by the dense gate matrix (zero for inactive experts) and multiply by all B_i stacked,
  one [T, n*r] x [n*r, d_out] matmul. More FLOPs than needed (n/k times), but no gathers: on CPU with
  small r it beats sparse kernels, whose r-wide GEMMs are inefficient.
- grouped: sort (token, expert) pairs by expert, gather their r-wide z rows, one grouped matmul
  (torch.nn.functional.grouped_mm), scatter-add back to tokens. FLOPs proportional to k, not n.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from comoe.routing import Routing, sort_by_expert

# With n/k at most this, the dense blocks matmul is cheaper than gather + grouped matmul + scatter.
BLOCKS_MAX_EXPERT_RATIO = 4


def down_project(x: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
    """z[t, i] = A_i x_t for all experts: [T, d_in] x [n, r, d_in] -> [T, n, r]."""
    n, r, d_in = lora_A.shape
    return (x @ lora_A.reshape(n * r, d_in).t()).view(-1, n, r)


def expert_gram(lora_B: torch.Tensor) -> torch.Tensor:
    """All Gram blocks B_i B_j^T as one [n*r, n*r] matrix (B stored [n, r, d_out]), in float32."""
    n, r, d_out = lora_B.shape
    flat = lora_B.float().reshape(n * r, d_out)
    return flat @ flat.t()


def mix_blocks(z: torch.Tensor, routing: Routing, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Gate-weighted sum of B_i z_i over active experts as one dense matmul over all experts."""
    n, r, d_out = lora_B.shape
    weighted = z * (routing.dense_gates() * scaling).to(z.dtype).unsqueeze(-1)
    return weighted.reshape(-1, n * r) @ lora_B.reshape(n * r, d_out)


def mix_grouped(z: torch.Tensor, routing: Routing, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Gate-weighted sum of B_i z_i over active experts, computing only the active pairs."""
    n, r, d_out = lora_B.shape
    pairs = sort_by_expert(routing.indices, n)
    gates = routing.gates.reshape(-1)[pairs.order] * scaling
    z_pairs = z[pairs.tokens, pairs.experts] * gates.to(z.dtype).unsqueeze(-1)
    out_pairs = grouped_matmul(z_pairs, lora_B, pairs.counts, pairs.offsets)
    return z.new_zeros(z.shape[0], d_out).index_add(0, pairs.tokens, out_pairs)


def mix(
    z: torch.Tensor, routing: Routing, lora_B: torch.Tensor, scaling: float, strategy: str
) -> torch.Tensor:
    if strategy == "auto":
        ratio = lora_B.shape[0] / routing.indices.shape[1]
        strategy = "blocks" if ratio <= BLOCKS_MAX_EXPERT_RATIO else "grouped"
    if strategy == "blocks":
        return mix_blocks(z, routing, lora_B, scaling)
    return mix_grouped(z, routing, lora_B, scaling)


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
