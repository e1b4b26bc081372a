"""Routing: which experts see a token and with what weight, and the expert-sorted layout of that choice.

Routing is reduced to plain tensors once per layer call (probabilities, top-k indices, renormalised
gates); every later step (expert compute, balance and contrastive losses, analysis) reads those.

How a layer reaches that decision is a routing kind (`RoutingKind`, chosen with `ComoeConfig.routing`):
the router's parameters (names and shapes, which are also the adapter file's keys under the layer's
path) and the map from the layer's input to a `Routing`. `topk` (sparse top-k of a per-token softmax)
and `soft` (every expert, softmax-weighted) are built in; others register with `register_routing`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from comoe.config import ComoeConfig
from comoe.plugins import Registry
from comoe.validation import InvalidSetting, fail

logger = logging.getLogger(__name__)


@dataclass
class Routing:
    """The routing decision for T tokens over n experts, k of which are active per token."""

    probs: torch.Tensor  # [T, n] float32 router softmax, differentiable
    indices: torch.Tensor  # [T, k] int64 active experts per token
    gates: torch.Tensor  # [T, k] weights of the active experts (sum to 1 per token), differentiable
    # [T, k] bool: which of the k slots hold an expert that is really active, for kinds whose number of
    # active experts varies per token in the k = n layout (their inactive slots have gate 0); None: all are
    active: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    def dense_gates(self) -> torch.Tensor:
        """[T, n] gate per (token, expert), zero for inactive experts."""
        return torch.zeros_like(self.probs).scatter(1, self.indices, self.gates)


def route(logits: torch.Tensor, top_k: int, soft: bool = False, normalize: bool = True) -> Routing:
    """Softmax over experts, then top-k; the gates are the chosen probabilities, renormalised to sum to 1
    over the chosen experts when `normalize` (transformers' `norm_topk_prob`; Mixtral, CoMoE, MoELoRA),
    or as they are (the Switch Transformer's top-1 gate p_i, Fedus et al. 2021, eq. 2). With top_k = 1
    a renormalised gate is p / p = 1 and gives the router no task gradient.

    Soft routing keeps every expert with its softmax weight: the same layout with k = n.
    Shapes: logits [T, n] -> probs [T, n] (float32), indices and gates [T, k].
    """
    probs = torch.softmax(logits.float(), dim=-1)
    if soft:
        indices = torch.arange(probs.shape[-1], device=probs.device).expand(probs.shape[0], -1)
        return Routing(probs, indices, probs)
    top_probs, indices = probs.topk(top_k, dim=-1)
    gates = top_probs / top_probs.sum(dim=-1, keepdim=True) if normalize else top_probs
    return Routing(probs, indices, gates)


@dataclass
class ExpertSort:
    """(token, expert) pairs sorted by expert, ScatterMoE-style: one gather, one grouped matmul."""

    order: torch.Tensor  # [T*k] positions in the flattened [T, k] routing, grouped by expert
    tokens: torch.Tensor  # [T*k] token index of each sorted pair
    experts: torch.Tensor  # [T*k] expert index of each sorted pair (non-decreasing)
    counts: torch.Tensor  # [n] pairs per expert
    offsets: torch.Tensor  # [n] int32 end of each expert's group (for grouped_mm)


def sort_by_expert(indices: torch.Tensor, num_experts: int) -> ExpertSort:
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    # scatter_add rather than bincount, which reads the largest index on the host (a GPU sync)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )
    return ExpertSort(
        order=order,
        tokens=order // indices.shape[1],
        experts=flat[order],
        counts=counts,
        offsets=torch.cumsum(counts, 0).to(torch.int32),
    )


class Router(nn.Linear):
    """Per-token gate logits W_g x over the experts, initialised as nn.Linear (small, symmetric)."""

    def __init__(self, in_features: int, num_experts: int) -> None:
        super().__init__(in_features, num_experts, bias=False)


class RoutingKind:
    """How an adapted layer routes its tokens (stateless, like an expert bank). Subclasses set `name` and
    `dense` and implement `route`; the default router is one `Router` (`router.weight` [n, d_in]).

    `route(layer, x)` reads the layer's `num_experts`, `top_k`, `normalize_gates`, its router parameters
    and, for kinds that need more than the token (a task id, the prompt), the per-call state on
    `layer.context`; it returns the router's logits [T, n] (kept for the router z-loss and analysis) and
    the `Routing` of the T tokens. A kind that activates a variable number of experts per token uses the
    k = n layout with zero gates for the inactive ones and sets `dense`."""

    name: ClassVar[str]
    dense: ClassVar[bool] = False  # whether any expert may be active for a token (the k = n layout)
    # Whether `route` reads the call's prompt (call_inputs PROMPT_MASK, PROMPT_CACHED), which the model binds
    # from the call's attention mask, labels and KV cache (adapter.streams.prompt_inputs).
    reads_prompt: ClassVar[bool] = False
    # The per-call inputs `route` reads from `layer.context.call_inputs` (e.g. "task_ids"): the model takes
    # them out of its call's arguments and refuses a call without them; none for per-token kinds.
    inputs: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def shapes(cls, num_experts: int, in_features: int) -> dict[str, tuple[int, ...]]:
        """Router parameter name (a path under the layer) -> shape; also the adapter file's keys."""
        return {"router.weight": (num_experts, in_features)}

    @classmethod
    def shapes_for(
        cls, config: ComoeConfig, num_experts: int, in_features: int
    ) -> dict[str, tuple[int, ...]]:
        """`shapes` for a kind whose router also depends on the configuration (a task vocabulary's size);
        the adapter's shapes are read through it. By default `shapes(num_experts, in_features)`."""
        return cls.shapes(num_experts, in_features)

    @classmethod
    def create(cls, layer: nn.Module, factory: dict) -> None:
        """Build the layer's router parameters on factory's device and dtype (nn.Linear's initialisation)."""
        layer.router = Router(layer.in_features, layer.num_experts).to(**factory)

    @classmethod
    def route(cls, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """x [T, d_in] (the router's input, in the router's dtype) -> (logits [T, n], Routing)."""
        raise NotImplementedError

    @classmethod
    def reset(cls, layer: nn.Module) -> None:
        """Drop what the kind keeps on the layer across calls (a prompt's routing decision, reused by the
        decode steps of a generation); the model calls it after each `generate`. Nothing by default."""


class TopKRouting(RoutingKind):
    """Sparse top-k routing of a per-token softmax (Shazeer et al. 2017; CoMoE, MoELoRA, MixLoRA): `route`."""

    name = "topk"

    @classmethod
    def route(cls, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        logits = layer.router(x)
        return logits, route(logits, layer.top_k, normalize=layer.normalize_gates)


class SoftRouting(RoutingKind):
    """Every expert weighted by the router's softmax (MoLoRA, HydraLoRA, OMoE): `route(..., soft=True)`."""

    name = "soft"
    dense = True

    @classmethod
    def route(cls, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        logits = layer.router(x)
        return logits, route(logits, layer.num_experts, soft=True)


def per_token(values: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """A per-sequence value [B] (or one value [1] for every sequence) repeated for each of the sequence's
    tokens: [num_tokens], num_tokens = B * length (the layer's input [B, length, d] flattened; with a KV
    cache the new tokens only, and under beam search B counts the beams, each row of an example kept
    together). ValueError when num_tokens is not a multiple of B."""
    rows = values.shape[0]
    if rows == 1:
        return values.expand(num_tokens, *values.shape[1:])
    if rows == 0 or num_tokens % rows:
        raise ValueError(
            f"a per-sequence input of {rows} rows cannot be spread over the {num_tokens} tokens a layer saw "
            "(not a whole number of tokens per sequence): pass one value per row of input_ids"
        )
    return values.repeat_interleave(num_tokens // rows, dim=0)


def check_task_ids(value: Any, num_tasks: int, batch: int | None = None) -> torch.Tensor:
    """A call's `task_ids` as an int64 tensor [batch] (or [1], one id for every sequence; a scalar counts as
    [1]): ids into the adapter's `num_tasks` tasks, -1 for a task outside them, as TaskRouting (MOELoRA,
    arXiv 2310.18339) and LoRAMoE's knowledge flags (arXiv 2312.09979) read them. `batch`: the call's
    number of sequences (None: not known, any length). ValueError naming task_ids, the value and the valid
    range for anything else: a non-integer dtype (floats are not truncated), another shape, an id below -1
    or of no task."""
    ids = torch.as_tensor(value)
    value = ids.tolist() if isinstance(value, torch.Tensor) else value  # shown on one line
    rows = "[1] or [batch]" if batch is None else f"[1] or [{batch}] (the call's batch)"
    valid = f"integers of shape {rows}, each in -1 .. {num_tasks - 1} (-1: a task outside the {num_tasks})"
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        fail("task_ids", value, f"{valid}; got dtype {ids.dtype}")
    ids = ids.reshape(1) if ids.dim() == 0 else ids
    n = ids.shape[0] if ids.dim() == 1 else -1
    if not (n in (1, batch) if batch is not None else n >= 1):
        fail("task_ids", value, f"{valid}; got shape {list(ids.shape)}")
    if bool(((ids < -1) | (ids >= num_tasks)).any()):
        fail("task_ids", value, valid)
    return ids.long()


class TaskRouting(RoutingKind):
    """MOELoRA's task-motivated gate (Liu et al. 2023, arXiv 2310.18339, eqs. 5-6): one learned embedding
    e_j [d_t] per task j of `config.tasks` and a gate W_T [n, d_t] per layer give the expert weights
    softmax(W_T e_j), dense (every expert) and the same for every token of an example of task j.

    Reads `task_ids` [B] (int64 ids into `config.tasks`, one per sequence; or [1] for all) from the call;
    an id of -1 (a task outside the vocabulary) gets the mean of the known tasks' gates. Parameters per
    layer: `task_embedding.weight` [num_tasks, d_t] (N(0, 1), as nn.Embedding) and `router.weight` [n, d_t]
    (nn.Linear's initialisation), as the released code's per-layer variant (github.com/liuqidong07/
    MOELoRA-peft, peft/tuners/mmoelora.py); its training script's variant shares one embedding and one gate
    across layers (docs/methods/moelora-liu.md). Logits and probabilities [T, n]."""

    name = "task"
    dense = True
    inputs = frozenset({"task_ids"})

    @classmethod
    def shapes(cls, num_experts: int, in_features: int) -> dict[str, tuple[int, ...]]:
        raise ValueError("routing='task': its router's shapes depend on tasks and task_embedding_dim")

    @classmethod
    def shapes_for(
        cls, config: ComoeConfig, num_experts: int, in_features: int
    ) -> dict[str, tuple[int, ...]]:
        if not config.tasks:
            raise ValueError(
                "tasks: null; routing='task' needs the task vocabulary (comoe train records the training "
                "examples' tasks; from Python set ComoeConfig(tasks=[...]))"
            )
        dim = config.task_embedding_dim
        return {"task_embedding.weight": (len(config.tasks), dim), "router.weight": (num_experts, dim)}

    @classmethod
    def create(cls, layer: nn.Module, factory: dict) -> None:
        shapes = cls.shapes_for(layer.config, layer.num_experts, layer.in_features)
        layer.task_embedding = nn.Embedding(*shapes["task_embedding.weight"]).to(**factory)
        layer.router = Router(layer.config.task_embedding_dim, layer.num_experts).to(**factory)

    @classmethod
    def task_logits(cls, layer: nn.Module, task_ids: torch.Tensor) -> torch.Tensor:
        """[B, n] gate logits W_T e_j of each sequence's task; an id of -1 gets the log of the mean of the
        known tasks' softmax gates (so that its softmax is that mean)."""
        known = layer.router(layer.task_embedding.weight)  # [num_tasks, n]
        ids = task_ids.to(known.device)
        mean = torch.softmax(known.float(), dim=-1).mean(0).log().to(known.dtype)  # no host sync: always
        return torch.where((ids < 0)[:, None], mean, known[ids.clamp_min(0)])

    @classmethod
    def route(cls, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        task_ids = layer.context.call_inputs.get("task_ids")
        if task_ids is None:
            raise ValueError(
                "task_ids: missing; routing='task' (MOELoRA) needs each sequence's task id ([B] int64 into "
                "the adapter's tasks, -1 for an unknown task) as a keyword of the model's call"
            )
        logits = per_token(cls.task_logits(layer, task_ids), x.shape[0])
        return logits, route(logits, layer.num_experts, soft=True)


ROUTINGS: Registry = Registry("routing", "routing kind")  # name -> RoutingKind subclass
register_routing = ROUTINGS.register
unregister_routing = ROUTINGS.unregister
get_routing = ROUTINGS.lookup  # ValueError naming the registered kinds when `name` is not one


register_routing(TopKRouting)
register_routing(SoftRouting)
register_routing(TaskRouting)


def routed_tasks(config: ComoeConfig | None) -> list[str] | None:
    """The task vocabulary an adapter of `config` routes by: its `tasks`, a task's id being its position,
    when its routing kind reads task ids (routing 'task': MOELoRA's gate softmax(W_T e_task), arXiv
    2310.18339, eqs. 5-6); None for every other adapter (loramoe's tasks weigh its training loss only, its
    routing is per token: arXiv 2312.09979) and for a model without a comoe adapter (`config` None)."""
    if config is None or "task_ids" not in get_routing(config.routing).inputs:
        return None
    return list(config.tasks or [])


def warn_unseen_tasks(config: ComoeConfig | None, tasks: Iterable[str], what: str = "examples") -> list[str]:
    """The names among `tasks` outside the task vocabulary of an adapter routed by task (`routed_tasks`),
    in order of first appearance, with one warning naming them, the vocabulary and `what` they are (e.g.
    "validation examples"): their id is -1, routed by the mean of the known tasks' gates (TaskRouting, the
    same gate for each of them). [] and no warning for an adapter that does not route by task (`config`
    None, or a routing kind that reads no task ids: a task name there is just data). Shared by evaluation,
    generation, analysis and training's validation, so each says the same."""
    vocabulary = routed_tasks(config)
    if vocabulary is None:
        return []
    unseen = list(dict.fromkeys(task for task in tasks if task not in vocabulary))
    if unseen:
        logger.warning(
            "tasks %s are not among the adapter's training tasks %s: their %s are routed with the mean of "
            "the known tasks' gates, the same gate for each of them",
            unseen,
            vocabulary,
            what,
        )
    return unseen


def routing_task_id(config: ComoeConfig | None, task: str, field: str = "task") -> int:
    """The id (position in `routed_tasks(config)`) of `task`, the name of a task to route every sequence
    by. InvalidSetting (a ValueError) naming `field` and the value: with the adapter's task names when
    `task` is none of them, and saying why when the adapter does not route by task (`config` None: no
    comoe adapter; another routing kind: its outputs are the same for every task)."""
    vocabulary = routed_tasks(config)
    if vocabulary is None:
        if config is None:
            reason = "the model has no comoe adapter"
        else:
            reason = f"this adapter's routing ({config.routing!r}) reads no task"
            if config.tasks:
                reason += " (its task vocabulary is not read at inference)"
        raise InvalidSetting(
            field,
            f"{field}={task!r} is invalid: {reason}, so its outputs are the same for every task: leave the "
            "task out (it applies to adapters routed by task: routing 'task', e.g. --preset moelora-liu)",
        )
    if task not in vocabulary:
        fail(field, task, "one of the adapter's tasks: " + ", ".join(repr(name) for name in vocabulary))
    return vocabulary.index(task)
