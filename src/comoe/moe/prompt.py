"""MiLoRA's prompt-aware routing: one routing decision per sequence, made from its prompt, for every token.

MiLoRA (Zhang et al., Findings of EMNLP 2024, arXiv 2410.18035) routes once per input: a router reads a
pooled representation of the prompt, picks the experts, and the decision is reused for every token of the
sequence, including each generated token (computed before the first new token, so a decode step routes
nothing). Its experts are the LoRA modules of a Transformer block; in comoe's per-linear layout our reading
is: each adapted linear has n LoRA experts and a router W_g [n, d_in], and a sequence's decision is the
top-k of softmax(W_g m), m the mean of the linear's input over the sequence's prompt tokens (top-k gates
renormalised as in `route`). docs/methods/milora.md says what the paper gives and what is ours.

What the prompt is, per call (the model binds it from the call: adapter.streams.prompt_inputs):
`call_inputs[PROMPT_MASK]` [B, L] bool marks the call's prompt tokens (real tokens whose label is -100 when
labels are given, the real tokens otherwise); `call_inputs[PROMPT_CACHED]` is present when the call
continues a KV cache (a decode step), and the layer then reuses the decision it stored at the prompt's call
(the prefill). A layer called on its own, outside a model's forward, takes its T tokens as one sequence
whose every token is prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from comoe.moe.record import token_columns
from comoe.moe.routing import Routing, RoutingKind, register_routing, route

PROMPT_MASK = "prompt_mask"  # [B, L] bool: the call's prompt tokens (all False on a decode step)
PROMPT_CACHED = "prompt_cached"  # present when the call continues a KV cache: reuse the prompt's decision
PROMPT_INPUTS = (PROMPT_MASK, PROMPT_CACHED)


@dataclass
class PromptDecision:
    """One routing decision per sequence: logits [B, n], and the Routing of the B sequences (probs [B, n],
    indices and gates [B, k]); detached where a layer keeps it for the decode steps."""

    logits: torch.Tensor
    routing: Routing

    def detached(self) -> PromptDecision:
        routing = self.routing
        return PromptDecision(
            self.logits.detach(), Routing(routing.probs.detach(), routing.indices, routing.gates.detach())
        )

    def per_token(self, num_tokens: int) -> tuple[torch.Tensor, Routing]:
        """(logits [T, n], Routing of T tokens): each sequence's decision repeated for its T / B tokens."""
        rows = self.logits.shape[0]
        length = num_tokens // rows if rows else 0

        def spread(values: torch.Tensor) -> torch.Tensor:
            return values.repeat_interleave(length, dim=0)

        routing = self.routing
        spread_routing = Routing(spread(routing.probs), spread(routing.indices), spread(routing.gates))
        return spread(self.logits), spread_routing


def pool_prompt(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of each sequence's prompt tokens: x [B * L, d] (a layer's input [B, L, d] flattened), mask
    [B, L] bool -> [B, d]; a sequence without prompt tokens pools to 0."""
    rows, length = mask.shape
    weights = mask.to(x.dtype)
    summed = (x.view(rows, length, -1) * weights.unsqueeze(-1)).sum(dim=1)
    return summed / weights.sum(dim=1, keepdim=True).clamp_min(1)


def prompt_decision(layer: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> PromptDecision:
    """The decision of each sequence from its pooled prompt: logits W_g m [B, n], the top-k of their softmax
    (`route` with the layer's top_k and gate normalisation). x [B * L, d_in], mask [B, L]."""
    logits = layer.router(pool_prompt(x, mask))
    return PromptDecision(logits, route(logits, layer.top_k, normalize=layer.normalize_gates))


def _call_mask(layer: nn.Module, num_tokens: int, device: torch.device) -> torch.Tensor:
    """The call's prompt mask for the layer's T tokens: [B, L] with B * L = T (the last L columns of a
    wider mask); ValueError when the tokens are not the mask's rows."""
    mask = layer.context.call_inputs.get(PROMPT_MASK)
    if mask is None:
        return torch.ones(1, num_tokens, dtype=torch.bool, device=device)
    columns = token_columns(mask, num_tokens)
    if columns is None:
        raise ValueError(
            f"routing='prompt': the layer saw {num_tokens} tokens, which are not the rows of the call's "
            f"prompt mask of shape {tuple(mask.shape)} (prompt routing supports decoder-only models, whose "
            "adapted linears see the input_ids' tokens)"
        )
    return columns.to(device)


class PromptRouting(RoutingKind):
    """MiLoRA's prompt-aware routing (see the module): `router.weight` [n, d_in] reads the mean of the
    layer's input over each sequence's prompt tokens; the top-k decision holds for all of the sequence's
    tokens and, under a KV cache, for its decode steps."""

    name = "prompt"
    reads_prompt = True

    @classmethod
    def create(cls, layer: nn.Module, factory: dict) -> None:
        super().create(layer, factory)
        layer.prompt_decision = None  # the last prompt's decision, detached, for the decode steps

    @classmethod
    def route(cls, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        mask = _call_mask(layer, x.shape[0], x.device)
        if PROMPT_CACHED in layer.context.call_inputs:
            decision = layer.prompt_decision
            if decision is None:
                raise ValueError(
                    "routing='prompt': this call continues a KV cache, but the layer holds no prompt "
                    "decision: run the prompt through this model first (generate does)"
                )
            rows = decision.logits.shape[0]
            if rows != mask.shape[0]:
                raise ValueError(
                    f"routing='prompt': a decode step of {mask.shape[0]} sequences continues a prompt of "
                    f"{rows}: "
                    "a KV cache whose rows were reordered or repeated (e.g. one prompt's cache per answer "
                    "option) has no per-row decision; run each sequence's prompt with it"
                )
            return decision.per_token(x.shape[0])
        decision = prompt_decision(layer, x, mask)
        layer.prompt_decision = decision.detached()
        return decision.per_token(x.shape[0])

    @classmethod
    def reset(cls, layer: nn.Module) -> None:
        layer.prompt_decision = None


PROMPT = register_routing(PromptRouting)
