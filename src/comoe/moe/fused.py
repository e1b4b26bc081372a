"""Routing and the blocks mix fused into one autograd Function with a hand-written backward.

    probs = softmax(logits),  G = top-k gates scattered to [T, n] (renormalised, or p as it is, or p for
    soft routing),  delta = (z * (G expanded over r) * scaling) @ B          z [T, n, r], B [n, r, d_out]

This is exactly `route` followed by the `blocks` strategy (comoe.moe.routing, comoe.moe.experts), with
fewer dispatched ops: on a GPU at comoe's sizes every aten op costs host time (docs/performance.md,
bench_dispatch.py), and autograd's generic backward of the unfused graph (the gate renormalisation, the
top-k gather, the scatter, the broadcasts) queues several ops per forward op. Here:

- the gates are spread over each expert's r columns by one matmul with a constant [n, n*r] block matrix
  that also carries the scaling, so gating is one multiply, with no reshapes;
- renormalised top-k gates are a softmax over the active experts' logits (p_i / sum_{j active} p_j =
  exp(l_i) / sum_{j active} exp(l_j)), so their backward is one softmax backward on the dense gates;
- the forward saves z, B, the probabilities, the dense gates, their expansion and the gated z, and the
  backward is seven matmuls and elementwise ops (dB, dz, dgates, dlogits), skipping what no input needs.

`LinearRouteMixBlocks` also takes in the router's and the down-projection's matmuls (x W_g^T, x W_down^T)
for banks whose down-projection is one matrix (`ExpertBank.down_weight`: lora, omoe), so the input's
gradient is gathered in one place and no autograd node sits between them.

Tested (tests/moe/test_fused.py): gradcheck in float64, and equal to route + blocks (and the written-out
matmuls) in values and every gradient (x, router, A, logits, z, B; through the logits, z, probabilities
and gates, as the objectives read them). The layer takes this path where the mix strategy resolves to
`blocks` and the routing kind is one of the built-in `topk` and `soft` (`fuses`), the linear form where
the bank has a `down_weight` and autocast is off; other strategies, routing kinds and banks keep the
general path.
"""

from __future__ import annotations

from typing import Any

import torch

from comoe.moe.routing import Routing, SoftRouting, TopKRouting

_EXPANSIONS: dict[tuple, torch.Tensor] = {}


def gate_expansion(
    num_experts: int, r: int, scaling: float, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[n, n*r]: row i holds `scaling` on expert i's r columns, 0 elsewhere, so dense gates [T, n] @ it
    are the gates repeated over each expert's rank, scaled. Built once per shape, device and dtype."""
    if torch.compiler.is_compiling():  # traced: a graph constant (writing the cache would be a side effect)
        return torch.eye(num_experts, device=device, dtype=dtype).repeat_interleave(r, dim=1) * scaling
    key = (num_experts, r, scaling, device, dtype)
    expansion = _EXPANSIONS.get(key)
    if expansion is None:
        expansion = torch.eye(num_experts, device=device, dtype=dtype).repeat_interleave(r, dim=1) * scaling
        _EXPANSIONS[key] = expansion
    return expansion


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The routing's dtype: float32 as `route`, float64 kept (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mix_forward(
    logits: torch.Tensor,
    flat_z: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    top_k: int,
    soft: bool,
    normalize: bool,
) -> tuple[torch.Tensor, ...]:
    """(delta, probs, indices, gates, and what the backward reads: dense, spread, weighted, expansion)
    from logits [T, n], z flattened [T, n*r] and B [n, r, d_out]; indices and gates None for soft."""
    n, r, d_out = lora_B.shape
    probs = torch.softmax(logits.to(_compute_dtype(logits.dtype)), dim=-1)
    if soft:
        indices, gates, dense = None, None, probs
    else:
        top, indices = probs.topk(top_k, dim=-1)
        gates = top / top.sum(dim=-1, keepdim=True) if normalize else top
        dense = torch.zeros_like(probs).scatter_(1, indices, gates)
    expansion = gate_expansion(n, r, scaling, probs.device, probs.dtype)
    spread = (dense @ expansion).to(flat_z.dtype)  # [T, n*r]: gate * scaling on each expert's r columns
    weighted = flat_z * spread
    delta = weighted @ lora_B.reshape(n * r, d_out)
    return delta, probs, indices, gates, dense, spread, weighted, expansion


def _mix_backward(
    saved: tuple[torch.Tensor, ...],
    options: tuple,
    grad_delta: torch.Tensor | None,
    grad_probs: torch.Tensor | None,
    grad_gates: torch.Tensor | None,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dL/dlogits, dL/dz flattened [T, n*r], dL/dB) for what `needs` asks (logits, z, B)."""
    flat_z, lora_B, probs, dense, spread, weighted, expansion = saved
    soft, normalize, indices = options
    n, r, d_out = lora_B.shape
    needs_logits, needs_z, needs_b = needs
    grad_logits = grad_z = grad_b = grad_dense = None
    if grad_delta is not None:
        grad_delta = grad_delta.to(weighted.dtype)
        if needs_b:
            grad_b = (weighted.t() @ grad_delta).view(n, r, d_out)
        if needs_z or needs_logits:
            grad_weighted = grad_delta @ lora_B.reshape(n * r, d_out).t()  # [T, n*r]
            if needs_z:
                grad_z = grad_weighted * spread
            if needs_logits:
                grad_dense = (grad_weighted * flat_z).to(expansion.dtype) @ expansion.t()  # [T, n]
    if needs_logits:
        if grad_gates is not None:  # an objective read the gates themselves
            scattered = torch.zeros_like(dense).scatter_(1, indices, grad_gates.to(dense.dtype))
            grad_dense = scattered if grad_dense is None else grad_dense + scattered
        grad_logits = _gates_backward(grad_dense, grad_probs, probs, dense, soft, normalize)
    return grad_logits, grad_z, grad_b


class RouteMixBlocks(torch.autograd.Function):
    """(logits [T, n], z [T, n, r], B [n, r, d_out]) -> (delta [T, d_out], probs [T, n], indices [T, k],
    gates [T, k]); soft routing: (delta, probs) (its indices are every expert, its gates the probs)."""

    @staticmethod
    def forward(  # noqa: PLR0913 (the routing's options)
        ctx: Any,
        logits: torch.Tensor,
        z: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float,
        top_k: int,
        soft: bool,
        normalize: bool,
    ) -> tuple[torch.Tensor, ...]:
        flat_z = z.reshape(z.shape[0], -1)
        mixed = _mix_forward(logits, flat_z, lora_B, scaling, top_k, soft, normalize)
        delta, probs, indices, gates, *kept = mixed
        # probs is returned as a view: a saved output would cost a detach when saved and when read
        ctx.save_for_backward(flat_z, lora_B, probs, *kept)
        ctx.options = (soft, normalize, indices)
        ctx.shapes = (logits.dtype, tuple(z.shape))
        ctx.set_materialize_grads(False)
        if soft:
            return delta, probs.view(probs.shape)
        ctx.mark_non_differentiable(indices)
        return delta, probs.view(probs.shape), indices, gates

    @staticmethod
    def backward(ctx: Any, grad_delta: torch.Tensor | None, *grad_routing: torch.Tensor | None) -> tuple:
        grad_probs = grad_routing[0] if grad_routing else None
        grad_gates = None if ctx.options[0] else grad_routing[2]
        grad_logits, grad_z, grad_b = _mix_backward(
            ctx.saved_tensors, ctx.options, grad_delta, grad_probs, grad_gates, ctx.needs_input_grad[:3]
        )
        logits_dtype, z_shape = ctx.shapes
        grad_logits = None if grad_logits is None else grad_logits.to(logits_dtype)
        grad_z = None if grad_z is None else grad_z.view(z_shape)
        return grad_logits, grad_z, grad_b, None, None, None, None


class LinearRouteMixBlocks(torch.autograd.Function):
    """The whole adapter term of a layer whose bank has a `down_weight`: (x [T, d_in], W_g [n, d_in],
    W_down [n*r, d_in], B [n, r, d_out], x_down [T, d_in] or None: the experts' input when it is not x,
    e.g. dropped out) -> (delta, logits [T, n], z [T, n, r], probs, indices, gates); soft routing:
    (delta, logits, z, probs). The router's and the down-projection's matmuls join RouteMixBlocks, so x's
    gradient is gathered in one place and no autograd node sits between them."""

    @staticmethod
    def forward(  # noqa: PLR0913 (the routing's options)
        ctx: Any,
        x: torch.Tensor,
        router_weight: torch.Tensor,
        down_weight: torch.Tensor,
        lora_B: torch.Tensor,
        x_down: torch.Tensor | None,
        scaling: float,
        top_k: int,
        soft: bool,
        normalize: bool,
    ) -> tuple[torch.Tensor, ...]:
        n, r, _ = lora_B.shape
        experts_input = x if x_down is None else x_down
        logits = x @ router_weight.t()
        flat_z = experts_input @ down_weight.t()  # [T, n*r]
        mixed = _mix_forward(logits, flat_z, lora_B, scaling, top_k, soft, normalize)
        delta, probs, indices, gates, *kept = mixed
        ctx.save_for_backward(x, router_weight, down_weight, x_down, flat_z, lora_B, probs, *kept)
        ctx.options = (soft, normalize, indices)
        ctx.set_materialize_grads(False)
        z = flat_z.view(-1, n, r)
        if soft:
            return delta, logits, z, probs.view(probs.shape)
        ctx.mark_non_differentiable(indices)
        return delta, logits, z, probs.view(probs.shape), indices, gates

    @staticmethod
    def backward(  # noqa: PLR0913 (one gradient per output)
        ctx: Any,
        grad_delta: torch.Tensor | None,
        grad_logits_out: torch.Tensor | None,
        grad_z_out: torch.Tensor | None,
        grad_probs: torch.Tensor | None,
        *grad_rest: torch.Tensor | None,
    ) -> tuple:
        x, router_weight, down_weight, x_down, *saved = ctx.saved_tensors
        needs_x, needs_router, needs_down, needs_b, needs_x_down = ctx.needs_input_grad[:5]
        needs_logits = needs_x or needs_router
        needs_z = needs_down or (needs_x if x_down is None else needs_x_down)
        grad_gates = None if ctx.options[0] else grad_rest[1]
        grad_logits, grad_z, grad_b = _mix_backward(
            tuple(saved), ctx.options, grad_delta, grad_probs, grad_gates, (needs_logits, needs_z, needs_b)
        )
        if grad_logits_out is not None and needs_logits:  # the router z-loss reads the logits
            grad_logits = grad_logits_out if grad_logits is None else grad_logits + grad_logits_out
        if grad_z_out is not None and needs_z:  # the contrastive objectives read z
            if grad_z is None:
                grad_z = grad_z_out.reshape(grad_z_out.shape[0], -1)
            else:  # grad_z is this backward's own tensor: add in place, whatever grad_z_out's layout
                grad_z.view(grad_z_out.shape).add_(grad_z_out)
        if grad_logits is not None:
            grad_logits = grad_logits.to(x.dtype)
        experts_input = x if x_down is None else x_down
        grad_x = grad_router = grad_down = grad_x_down = None
        if grad_logits is not None:
            grad_router = grad_logits.t() @ x if needs_router else None
            grad_x = grad_logits @ router_weight if needs_x else None
        if grad_z is not None:
            grad_down = grad_z.t() @ experts_input if needs_down else None
            if x_down is None and needs_x:
                from_z = grad_z @ down_weight
                grad_x = from_z if grad_x is None else grad_x + from_z
            elif x_down is not None and needs_x_down:
                grad_x_down = grad_z @ down_weight
        return grad_x, grad_router, grad_down, grad_b, grad_x_down, None, None, None, None


def _softmax_backward(grad: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """The gradient of a softmax's input from its output's gradient: output * (grad - <grad, output>)."""
    return torch._softmax_backward_data(grad, output, -1, output.dtype)


def _gates_backward(
    grad_dense: torch.Tensor | None,
    grad_probs: torch.Tensor | None,
    probs: torch.Tensor,
    dense: torch.Tensor,
    soft: bool,
    normalize: bool,
) -> torch.Tensor | None:
    """dL/dlogits from the dense gates' and the probabilities' gradients. Renormalised top-k gates are a
    softmax over the active experts (zero elsewhere): one softmax backward on the dense gates. Soft gates
    are the probabilities; plain top-k gates are p on the active experts (their mask: dense > 0, or
    where p underflowed to 0 a zero gate whose gradient p * (...) is 0 either way)."""
    if not soft and normalize:
        parts = [] if grad_dense is None else [_softmax_backward(grad_dense, dense)]
        if grad_probs is not None:
            parts.append(_softmax_backward(grad_probs.to(probs.dtype), probs))
        return None if not parts else parts[0] if len(parts) == 1 else parts[0] + parts[1]
    if grad_dense is not None and not soft:
        grad_dense = torch.where(dense > 0, grad_dense, 0)
    total = grad_dense
    if grad_probs is not None:
        total = grad_probs.to(probs.dtype) if total is None else total + grad_probs
    return None if total is None else _softmax_backward(total, probs)


def route_and_mix(
    logits: torch.Tensor,
    z: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    top_k: int,
    soft: bool = False,
    normalize: bool = True,
) -> tuple[torch.Tensor, Routing]:
    """`route(logits, top_k, soft, normalize)` then `mix_blocks(z, routing, lora_B, scaling)` as one
    RouteMixBlocks: (delta [T, d_out] in z's dtype, the Routing). Shapes: logits [T, n], z [T, n, r],
    lora_B [n, r, d_out]."""
    if soft:
        delta, probs = RouteMixBlocks.apply(logits, z, lora_B, scaling, top_k, True, normalize)
        indices = torch.arange(probs.shape[-1], device=probs.device).expand(probs.shape[0], -1)
        return delta, Routing(probs, indices, probs)
    delta, probs, indices, gates = RouteMixBlocks.apply(logits, z, lora_B, scaling, top_k, False, normalize)
    return delta, Routing(probs, indices, gates)


def linear_route_and_mix(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    down_weight: torch.Tensor,
    lora_B: torch.Tensor,
    x_down: torch.Tensor | None,
    scaling: float,
    top_k: int,
    soft: bool = False,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Routing]:
    """x W_g^T as the router's logits, (x_down or x) W_down^T as z, then `route_and_mix`, as one
    LinearRouteMixBlocks: (delta [T, d_out], logits [T, n], z [T, n, r], Routing). Shapes: x, x_down
    [T, d_in]; router_weight [n, d_in]; down_weight [n*r, d_in]; lora_B [n, r, d_out]."""
    args = (x, router_weight, down_weight, lora_B, x_down, scaling, top_k, soft, normalize)
    if soft:
        delta, logits, z, probs = LinearRouteMixBlocks.apply(*args)
        indices = torch.arange(probs.shape[-1], device=probs.device).expand(probs.shape[0], -1)
        return delta, logits, z, Routing(probs, indices, probs)
    delta, logits, z, probs, indices, gates = LinearRouteMixBlocks.apply(*args)
    return delta, logits, z, Routing(probs, indices, gates)


def linear_mix_inference(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    down_weight: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    top_k: int,
    soft: bool = False,
    normalize: bool = True,
) -> torch.Tensor:
    """delta [T, d_out] of `linear_route_and_mix` (x, the experts' input too, [T, d_in]) where nothing is
    differentiated and no routing is kept (generation, evaluation): the same experts and gates in fewer
    ops. The top-k of the logits (softmax is monotonic) and, for renormalised gates, the softmax over the
    k chosen logits — equal to the renormalised top-k probabilities, softmax(l)_i / sum_top softmax(l) —
    instead of a softmax over all n experts, a top-k and a renormalisation; no autograd Function, no
    outputs kept. Tested equal to linear_route_and_mix's delta (tests/moe/test_fused.py)."""
    n, r, d_out = lora_B.shape
    logits = (x @ router_weight.t()).to(_compute_dtype(x.dtype))  # the routing in float32, as route's
    flat_z = x @ down_weight.t()  # [T, n*r]
    if soft:
        dense = torch.softmax(logits, dim=-1)
    elif normalize:
        top, indices = logits.topk(top_k, dim=-1)
        dense = torch.zeros_like(logits).scatter_(1, indices, torch.softmax(top, dim=-1))
    else:  # Switch-style: the top-k probabilities as they are
        top, indices = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
        dense = torch.zeros_like(logits).scatter_(1, indices, top)
    spread = (dense @ gate_expansion(n, r, scaling, logits.device, logits.dtype)).to(flat_z.dtype)
    return (flat_z * spread) @ lora_B.reshape(n * r, d_out)


def autocasting(device_type: str) -> bool:
    """Whether torch.autocast is on for the device type (False for types autocast does not know: meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def fuses(routing_kind: type, strategy: str) -> bool:
    """Whether a layer with this routing kind whose mix strategy resolved to `strategy` takes
    route_and_mix: the built-in topk and soft kinds (exactly: a registered subclass may route otherwise)
    with the blocks strategy."""
    return strategy == "blocks" and routing_kind in (TopKRouting, SoftRouting)
