"""ComoeConfig: what a mixture-of-LoRA-experts adapter is, validated when it is built, and the presets.

Field names follow PEFT's LoraConfig where the meaning is the same (r, lora_alpha, lora_dropout,
target_modules, layers_to_transform), so a PEFT user can read a comoe config at a glance. Pure Python (no
torch, no peft): the command line reads the presets without loading either. Reading adapter_config.json
is comoe.adapter.folder's job, writing it comoe.adapter.serialization's.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from comoe.validation import InvalidSetting, check_choice, check_int, check_number, fail, reject_unknown

# Routing kinds whose layout is dense (any expert may be active for a token); the routing registry
# (comoe.moe.routing) holds every kind, and kinds registered elsewhere are taken as top-k sparse here.
DENSE_ROUTINGS = ("soft", "task", "threshold")
# The contrastive objectives the `contrastive` field names (sugar for an entry of objective_weights);
# any other registered objective (comoe.objectives.registry) is named in aux_objectives.
CONTRASTIVES = ("none", "comoe", "moelora")
ANCHORS = ("all", "random")
# Fields added after format version 1 whose defaults are left out of adapter_config.json, so that a folder
# saved with the defaults reads exactly as before (and in older comoe versions).
OMITTED_DEFAULTS = {
    "aux_objectives": {},
    "expert_bank": "lora",
    "router_jitter": 0.0,
    "experts_by_depth": None,
    "tasks": None,
    "task_embedding_dim": 64,
    "knowledge_tasks": [],
    "localized_balance_delta": 0.1,
    "ffn_experts": None,
}
# norm_topk_prob is left out too where it resolves to renormalised gates; a folder without it was written
# before the field existed, when top-k gates were always renormalised (see adapter.folder).
ADAPTER_DTYPES = ("float32", "bfloat16", "float16", "base")
ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _field(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field that carries its help text, as PEFT's configs do."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class ComoeConfig:
    """Configuration of a mixture of LoRA experts with an optional contrastive expert objective."""

    num_experts: int = _field(4, "Number n of LoRA experts per adapted linear layer (>= 1).")
    top_k: int = _field(
        2, "Experts activated per token, 1 <= top_k <= num_experts (ignored by soft routing)."
    )
    r: int = _field(16, "Rank of each expert's LoRA (>= 1).")
    lora_alpha: float = _field(
        32.0, "LoRA scaling numerator: each expert's output is scaled by lora_alpha / r."
    )
    lora_dropout: float = _field(0.05, "Dropout on the experts' input, in [0, 1).")
    target_modules: list[str] | str = _field(
        ATTENTION_MODULES,
        "Linear layers to adapt: a list of names matched against the end of each module path "
        "(as PEFT), or one regular expression that must match the whole path, or 'all-linear' (PEFT's "
        "shorthand: every linear layer except the output head; the adapter records the resolved list).",
    )
    layers_to_transform: list[int] | None = _field(
        None, "Only adapt modules inside these transformer block indices (None: every block)."
    )
    routing: str = _field(
        "topk",
        "A registered routing kind (comoe.moe.routing): 'topk', sparse top-k of a per-token softmax; "
        "'soft', every expert softmax-weighted; 'threshold', AdaMoLE's learned per-token threshold (a "
        "variable number of experts per token); 'prompt', MiLoRA's prompt-aware top-k routing (one decision "
        "per sequence, from the mean of its prompt tokens).",
    )
    norm_topk_prob: bool | None = _field(
        None,
        "Renormalise the top-k gates to sum to 1 (transformers' norm_topk_prob) or keep the router's "
        "probabilities (the Switch Transformer's gate); None: renormalise for top_k >= 2, not for top_k = 1, "
        "whose renormalised gate would be 1 and give the router no task gradient.",
    )
    router_jitter: float = _field(
        0.0,
        "Router jitter eps in [0, 1): in training, the router's input is multiplied by noise drawn uniformly "
        "from [1 - eps, 1 + eps] (the Switch Transformer's, which used 0.01); 0: none. The experts' input "
        "and evaluation are unchanged.",
    )
    balance_weight: float = _field(
        0.0, "Weight of the Switch-style load-balancing loss n * sum_i f_i * P_i (>= 0; 0 turns it off)."
    )
    balance_scope: str = _field(
        "local",
        "Where the balance loss counts expert load f_i under multi-process training: 'local' (each "
        "process's own tokens) or 'global' (all processes' tokens, one all_reduce per layer).",
    )
    contrastive: str = _field(
        "none", "Contrastive expert objective: 'none', 'comoe' (CoMoE InfoNCE) or 'moelora' (MoELoRA)."
    )
    contrastive_weight: float = _field(
        0.01, "Weight lambda of the contrastive loss in the total loss (>= 0)."
    )
    temperature: float = _field(0.5, "Temperature tau of the contrastive InfoNCE similarities (> 0).")
    anchor: str = _field(
        "all", "CoMoE anchors: 'all' activated experts (deterministic) or one 'random' one (the paper)."
    )
    num_negatives: int | None = _field(
        None, "CoMoE: sample this many inactive experts as negatives per token (None: all of them)."
    )
    contrastive_norm_floor: float = _field(
        1e-3,
        "Contrastive cosines treat an expert output shorter than this fraction of the base layer's output "
        "(per token) as having no direction, which bounds the gradient at B = 0; 0: the plain cosine.",
    )
    contrastive_max_tokens: int = _field(
        128, "MoELoRA: at most this many tokens per layer and step enter the contrastive loss (>= 1)."
    )
    adapter_dtype: str = _field(
        "float32",
        "dtype of the experts and routers: 'float32' (as PEFT keeps adapter weights, also on bf16, fp16 and "
        "quantized bases), 'bfloat16', 'float16', or 'base' (the base layer's float dtype).",
    )
    modules_to_save: list[str] | None = _field(
        None,
        "Modules trained in full and saved with the adapter, e.g. a new classification head ('score', "
        "'classifier'), matched as target_modules are (names matched against the end of each path).",
    )
    expert_compute: str = _field(
        "auto",
        "How expert outputs are computed, a strategy of comoe.moe.experts: 'blocks' (masked up-projection "
        "in one matmul), 'grouped' (tokens sorted by expert, grouped matmul), 'triton' (one fused Triton "
        "kernel, CUDA; the extra comoe[triton]), or 'auto' (the strategy the device prefers for this shape).",
    )
    aux_objectives: dict[str, float] = _field(
        {},
        "Further auxiliary objectives by registered name and weight, {name: weight} (comoe.objectives."
        "registry); balance_weight and contrastive/contrastive_weight are the built-ins' entries.",
    )
    expert_bank: str = _field(
        "lora",
        "The experts' parameterisation, a registered expert bank (comoe.moe.banks): 'lora' (each expert "
        "its own A [r, d_in] and B [r, d_out]), 'hydra' (HydraLoRA: one A [r, d_in] shared by all "
        "experts, n heads B [r, d_out]), 'omoe' (OMoE: the experts' up-projections orthonormalised "
        "together by Gram-Schmidt, so different experts' outputs are orthogonal; needs num_experts * r "
        "<= d_out) or 'dora' (DoRA experts: each expert's LoRA plus a magnitude vector [d_out] over the "
        "base weight's row norms; needs an unquantized base weight).",
    )

    experts_by_depth: list[int] | None = _field(
        None,
        "Experts per layer by depth (MoLA): the transformer blocks split, bottom to top, into as many "
        "contiguous groups as entries (block b of L in group b * len // L), each group's adapted linears "
        "with that many experts; num_experts must be the largest entry (linears outside the blocks get it) "
        "and every entry >= top_k. None: num_experts everywhere.",
    )

    ffn_experts: list[str] | None = _field(
        None,
        "MixLoRA's FFN-block experts (arXiv 2404.15159): the MLP modules named here (matched as "
        "target_modules, e.g. ['mlp']; each a gated MLP with gate_proj, up_proj, down_proj and act_fn) "
        "become one routed mixture of num_experts whole FFN experts sharing the frozen FFN, with LoRA on "
        "their three projections and one router on the MLP's input; the target_modules linears then get a "
        "plain LoRA each (one expert, no router). None: every target is a per-linear mixture.",
    )

    tasks: list[str] | None = _field(
        None,
        "The task vocabulary of methods that read each example's task (routing: task, the loramoe "
        "objective): task names, a task's id being its position; fixed at training (comoe train records the "
        "training examples' tasks in order of first appearance) and saved in adapter_config.json, so "
        "evaluation maps names to the same ids. None: no task vocabulary.",
    )
    task_embedding_dim: int = _field(
        64,
        "routing: task (MOELoRA, Liu et al. 2023): the dimension d_t of the learned task embeddings (>= 1; "
        "64 in the released code).",
    )
    knowledge_tasks: list[str] = _field(
        [],
        "The loramoe objective (LoRAMoE's localized balancing constraint): the tasks whose examples are of "
        "the world-knowledge type, tied to experts n//2 .. n-1; every other task (and a task outside "
        "`tasks`) is of the downstream-task type, tied to experts 0 .. n//2-1.",
    )
    localized_balance_delta: float = _field(
        0.1,
        "The loramoe objective: delta in [0, 1), the weight 1 + delta (1 - delta) of an expert's importance "
        "on examples of its own (the other) type (LoRAMoE's blc_alpha).",
    )

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple | set):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field, its value and the valid range."""
        check_int("num_experts", self.num_experts, low=1)
        check_int("r", self.r, low=1)
        check_int("top_k", self.top_k, low=1)
        if self.top_k > self.num_experts:
            fail("top_k", self.top_k, f"1 <= top_k <= num_experts ({self.num_experts})")
        check_number("lora_alpha", self.lora_alpha, low=0.0, low_open=True)
        check_number("lora_dropout", self.lora_dropout, low=0.0, high=1.0)
        check_number("router_jitter", self.router_jitter, low=0.0, high=1.0)
        check_number("balance_weight", self.balance_weight, low=0.0)
        check_number("contrastive_weight", self.contrastive_weight, low=0.0)
        check_number("temperature", self.temperature, low=0.0, low_open=True)
        check_number("contrastive_norm_floor", self.contrastive_norm_floor, low=0.0)
        _check_name("routing", self.routing)  # the routing registry checks it exists
        check_choice("balance_scope", self.balance_scope, ("local", "global"))
        check_choice("contrastive", self.contrastive, CONTRASTIVES)
        check_choice("anchor", self.anchor, ANCHORS)
        if self.norm_topk_prob is not None and not isinstance(self.norm_topk_prob, bool):
            fail("norm_topk_prob", self.norm_topk_prob, "true, false or null")
        _check_name("expert_compute", self.expert_compute)  # the strategy registry checks it exists
        _check_name("expert_bank", self.expert_bank)  # the bank registry checks it exists
        self._validate_objectives()
        check_choice("adapter_dtype", self.adapter_dtype, ADAPTER_DTYPES)
        if self.modules_to_save is not None and (
            not isinstance(self.modules_to_save, list)
            or not all(isinstance(name, str) and name for name in self.modules_to_save)
        ):
            fail("modules_to_save", self.modules_to_save, "a list of module names or null")
        check_int("contrastive_max_tokens", self.contrastive_max_tokens, low=1)
        if self.num_negatives is not None:
            check_int("num_negatives", self.num_negatives, low=1)
        if self.contrastive == "comoe" and self.active_experts < 2:
            fail(
                "top_k",
                self.top_k,
                ">= 2 with contrastive='comoe' (an anchor needs another activated expert as its positive)",
            )
        self._validate_targets()
        self._validate_depths()
        self._validate_ffn_experts()
        self._validate_tasks()
        if self.layers_to_transform is not None:
            for index in self.layers_to_transform:
                check_int("layers_to_transform", index, low=0)

    def _validate_depths(self) -> None:
        depths = self.experts_by_depth
        if depths is None:
            return
        if not isinstance(depths, list) or not depths:
            fail("experts_by_depth", depths, "a non-empty list of expert counts (bottom to top) or null")
        for count in depths:
            check_int("experts_by_depth", count, low=self.top_k)
        if self.num_experts != max(depths):  # either may be the one changed: name both
            raise InvalidSetting(
                "experts_by_depth",
                f"experts_by_depth={depths!r} and num_experts={self.num_experts!r} disagree: expected "
                "max(experts_by_depth) = num_experts (change one to match the other)",
            )

    def _validate_ffn_experts(self) -> None:
        modules = self.ffn_experts
        if modules is None:
            return
        if not isinstance(modules, list) or not modules or not all(isinstance(m, str) and m for m in modules):
            fail("ffn_experts", modules, "a non-empty list of MLP module names or null")
        if self.contrastive != "none":
            fail(
                "contrastive",
                self.contrastive,
                "'none' with ffn_experts (the contrastive objectives compare expert outputs B_i A_i x of "
                "one linear; an FFN-block expert's output is not of that form)",
            )

    def _validate_tasks(self) -> None:
        def names(field_name: str, value: Any) -> None:
            if not isinstance(value, list) or not all(isinstance(t, str) and t for t in value):
                fail(field_name, value, "a list of task names")
            if len(set(value)) != len(value):
                fail(field_name, value, "distinct task names")

        if self.tasks is not None:
            names("tasks", self.tasks)
            if not self.tasks:
                fail("tasks", self.tasks, "a non-empty list of task names or null")
        names("knowledge_tasks", self.knowledge_tasks)
        unknown = [name for name in self.knowledge_tasks if self.tasks is not None and name not in self.tasks]
        if unknown:
            valid = f"names among the adapter's tasks {self.tasks!r}; not tasks: {unknown!r}"
            fail("knowledge_tasks", self.knowledge_tasks, valid)
        check_int("task_embedding_dim", self.task_embedding_dim, low=1)
        check_number("localized_balance_delta", self.localized_balance_delta, low=0.0, high=1.0)

    def experts_at(self, block: int | None, num_blocks: int) -> int:
        """The number of experts of an adapted linear in transformer block `block` of `num_blocks`
        (experts_by_depth's group of the block; num_experts without it or outside the blocks)."""
        depths = self.experts_by_depth
        if depths is None or block is None or num_blocks < 1:
            return self.num_experts
        return depths[min(block * len(depths) // num_blocks, len(depths) - 1)]

    def at_depth(self, block: int | None, num_blocks: int) -> ComoeConfig:
        """The configuration of one adapted linear: this one, with experts_by_depth resolved into
        num_experts for the linear's block (itself when experts_by_depth is None)."""
        if self.experts_by_depth is None:
            return self
        num_experts = self.experts_at(block, num_blocks)
        return dataclasses.replace(self, num_experts=num_experts, experts_by_depth=None)

    def _validate_objectives(self) -> None:
        objectives = self.aux_objectives
        valid = "a mapping {objective name: weight >= 0}"
        if not isinstance(objectives, dict) or not all(isinstance(k, str) and k for k in objectives):
            fail("aux_objectives", objectives, valid)
        for name, weight in objectives.items():
            check_number(f"aux_objectives[{name!r}]", weight, low=0.0)
        sugar = {"balance": "balance_weight", **{c: "contrastive" for c in CONTRASTIVES if c != "none"}}
        for name in objectives:
            if name in sugar and name in self._sugar_weights():
                fail("aux_objectives", objectives, f"{name!r} is already set by {sugar[name]}: set it once")

    def _sugar_weights(self) -> dict[str, float]:
        """The objectives the built-in fields turn on, with their weights."""
        weights = {}
        if self.balance_weight > 0:
            weights["balance"] = self.balance_weight
        if self.contrastive != "none" and self.contrastive_weight > 0:
            weights[self.contrastive] = self.contrastive_weight
        return weights

    @property
    def objective_weights(self) -> dict[str, float]:
        """Every active auxiliary objective by registered name, with its weight (> 0): balance_weight and
        contrastive/contrastive_weight as entries, then aux_objectives."""
        return {**self._sugar_weights(), **{k: float(w) for k, w in self.aux_objectives.items() if w > 0}}

    def _validate_targets(self) -> None:
        targets = self.target_modules
        valid = "a non-empty list of module names or one regular expression"
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as error:
                fail("target_modules", targets, f"{valid} (not a valid regular expression: {error})")
        elif (
            not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets)
        ):
            fail("target_modules", targets, valid)
        if self.layers_to_transform is not None and not isinstance(self.layers_to_transform, list):
            fail("layers_to_transform", self.layers_to_transform, "a list of block indices or null")

    @property
    def active_experts(self) -> int:
        """Experts that may contribute to a token: top_k, or all of them with a dense routing kind."""
        return self.num_experts if self.routing in DENSE_ROUTINGS else self.top_k

    @property
    def zero_objective(self) -> str | None:
        """Why the configured contrastive objective is identically zero, or None: CoMoE contrasts each
        token's activated experts with its inactive ones (arXiv 2505.17553), so a routing that activates
        every expert (a dense kind, or top_k = num_experts) leaves it no negatives. Not a config error (a
        saved adapter still loads and runs); training refuses it (comoe.training.registered), and
        get_comoe_model warns."""
        if self.contrastive != "comoe" or self.active_experts < self.num_experts:
            return None
        which = f"routing={self.routing!r}" if self.routing in DENSE_ROUTINGS else f"top_k={self.top_k}"
        return (
            "contrastive='comoe' contrasts each token's activated experts with its inactive ones, and "
            f"{which} activates all {self.num_experts} experts, so its loss is always 0: use routing 'topk' "
            "with top_k < num_experts, or contrastive 'moelora'"
        )

    @property
    def normalize_gates(self) -> bool:
        """Whether top-k gates are renormalised (norm_topk_prob resolved; see its help)."""
        return self.norm_topk_prob if self.norm_topk_prob is not None else self.top_k > 1

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ComoeConfig:
        """The configurations of the papers and the baselines, by name (see PRESETS)."""
        return cls.from_preset(name, overrides)

    @classmethod
    def from_preset(cls, name: str, overrides: dict[str, Any], where: str = "adapter config") -> ComoeConfig:
        """A preset with field overrides; errors in the overrides are reported under `where`."""
        if name not in PRESETS:
            raise ValueError(f"preset: unknown value {name!r}; valid presets: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides}, where)

    def to_dict(self) -> dict[str, Any]:
        """Every field, except the later fields still at their defaults (OMITTED_DEFAULTS)."""
        values = dataclasses.asdict(self)
        for key, default in OMITTED_DEFAULTS.items():
            if values[key] == default:
                del values[key]
        if self.norm_topk_prob is None and self.normalize_gates:  # reads back as before: renormalised
            del values["norm_topk_prob"]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "adapter config") -> ComoeConfig:
        """Build from a saved dict, refusing unknown fields so that typos do not pass silently."""
        reject_unknown(values, (f.name for f in dataclasses.fields(cls)), where)
        return cls(**values)


_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _check_name(name: str, value: Any) -> None:
    """A registry name: letters, digits, '_', '-', '.' (whether it is registered is checked where the
    registry lives, above this pure-Python module)."""
    if not isinstance(value, str) or not _NAME.match(value):
        fail(name, value, "a registered name (letters, digits, '_', '-', '.')")


# Baselines trained through PEFT at a comoe preset's targets and trainable-parameter count (comoe.adapter.
# method registers how each is built): baseline name -> the preset it matches.
BASELINES: dict[str, str] = {"lora": "comoe", "dora": "comoe"}

PRESETS: dict[str, dict[str, Any]] = {
    # CoMoE paper defaults: 4 experts, top-2, r=16, alpha=32, q/k/v/o, no balance loss, lambda=0.01.
    "comoe": dict(
        num_experts=4, top_k=2, r=16, lora_alpha=32.0, contrastive="comoe", contrastive_weight=0.01
    ),
    # Plain top-2 MoE-LoRA: the CoMoE architecture without the contrastive loss (the ablation).
    "moe": dict(num_experts=4, top_k=2, r=16, lora_alpha=32.0, contrastive="none"),
    # MoELoRA: 8 experts, top-2, load balancing and expert-identity contrastive learning.
    "moelora": dict(
        num_experts=8,
        top_k=2,
        r=16,
        lora_alpha=32.0,
        balance_weight=0.01,
        contrastive="moelora",
        contrastive_weight=0.01,
    ),
    # MixLoRA per linear: 8 experts top-2 on each adapted linear, Switch load balancing, no contrastive loss
    # (MixLoRA's routing and loss, not its FFN-block experts: those are 'mixlora-ffn').
    "mixlora": dict(num_experts=8, top_k=2, r=16, lora_alpha=32.0, balance_weight=0.01, contrastive="none"),
    # MixLoRA (arXiv 2404.15159) in its paper's form, as MoE-PEFT's "mixlora" template runs it: 8 FFN-block
    # experts top-2 (LoRA r=16, alpha=32, dropout 0.05 on gate/up/down, sharing the frozen FFN), plain LoRA on
    # q/k/v/o, Switch balancing 1e-3 (MoE-PEFT's router_aux_loss_coef default; docs/methods/mixlora.md).
    "mixlora-ffn": dict(
        num_experts=8,
        top_k=2,
        r=16,
        lora_alpha=32.0,
        lora_dropout=0.05,
        balance_weight=0.001,
        ffn_experts=["mlp"],
        contrastive="none",
    ),
    # HydraLoRA (arXiv 2404.19245) as its released training script runs it: one shared A of rank 4 and 4 B
    # heads, alpha 32, dropout 0.05, a dense softmax router over the heads, the FFN projections, no
    # auxiliary loss (docs/methods/hydralora.md).
    "hydralora": dict(
        num_experts=4,
        r=4,
        lora_alpha=32.0,
        lora_dropout=0.05,
        routing="soft",
        expert_bank="hydra",
        target_modules=["gate_proj", "up_proj", "down_proj"],
        contrastive="none",
    ),
    # OMoE (arXiv 2501.10062) in CoMoE's comparison setup: 4 experts, soft routing, r=16, alpha=32, q/k/v/o;
    # the experts' up-projections orthonormalised by Gram-Schmidt (docs/methods/omoe.md), no auxiliary loss.
    "omoe": dict(
        num_experts=4, r=16, lora_alpha=32.0, routing="soft", expert_bank="omoe", contrastive="none"
    ),
    # MoLA (arXiv 2402.08562), its best allocation "MoLA-▽" (more experts higher up: 2/4/6/8 experts for the
    # four quarters of the blocks, bottom to top), top-2, as the release's commands train it: r=8, alpha 16,
    # dropout 0.05 on every attention and MLP linear, no auxiliary loss (docs/methods/mola.md).
    "mola": dict(
        num_experts=8,
        experts_by_depth=[2, 4, 6, 8],
        top_k=2,
        r=8,
        lora_alpha=16.0,
        target_modules=[*ATTENTION_MODULES, "gate_proj", "up_proj", "down_proj"],
        contrastive="none",
    ),
    # AdaMoLE (arXiv 2405.00361) as its release trains it (configs/llama_adamole_csr_train.config, train.py):
    # 8 experts sharing a total rank of 32 (r=4 each), alpha 16, dropout 0.05, q/k/v/o, the learned threshold
    # with tau_max = 1/8, Switch balancing 1e-3 (docs/methods/adamole.md).
    "adamole": dict(
        num_experts=8,
        r=4,
        lora_alpha=16.0,
        lora_dropout=0.05,
        routing="threshold",
        balance_weight=0.001,
        contrastive="none",
    ),
    # MiLoRA (Zhang et al., Findings of EMNLP 2024, arXiv 2410.18035): prompt-aware routing, one top-k
    # decision per sequence from the mean of each adapted linear's input over the prompt, reused for every
    # token and decode step. The paper's settings were not available to us: CoMoE's experts (4, top-2, r=16,
    # alpha=32, q/k/v/o) for a like-for-like comparison, no auxiliary loss (docs/methods/milora.md).
    "milora": dict(num_experts=4, top_k=2, r=16, lora_alpha=32.0, routing="prompt", contrastive="none"),
    # CoMoE with DoRA experts (the CoMoE paper's Table 2, arXiv 2505.17553): CoMoE's defaults (4 experts,
    # top-2, r=16, alpha=32, q/k/v/o, lambda=0.01), each expert a DoRA (arXiv 2402.09353; docs/methods/
    # comoe-dora.md).
    "comoe-dora": dict(
        num_experts=4,
        top_k=2,
        r=16,
        lora_alpha=32.0,
        expert_bank="dora",
        contrastive="comoe",
        contrastive_weight=0.01,
    ),
    # MOELoRA of Liu et al. 2023 (arXiv 2310.18339; not the 'moelora' preset above, Luo et al.'s MoELoRA): the
    # LoRA's rank 16 split into 8 experts of rank 2 with a dense gate softmax(W E[task]) from a learned task
    # embedding (d_t = 64), the same weights for every token of an example; all attention and MLP linears,
    # dropout 0.1 as experiments/moelora.bash; lora_alpha 4 keeps the released code's scaling 32 / 16 = 2,
    # which divides by the total rank (docs/methods/moelora-liu.md).
    "moelora-liu": dict(
        num_experts=8,
        r=2,
        lora_alpha=4.0,
        lora_dropout=0.1,
        routing="task",
        target_modules=[*ATTENTION_MODULES, "gate_proj", "up_proj", "down_proj"],
        contrastive="none",
    ),
    # LoRAMoE (Dou et al. 2024, arXiv 2312.09979) as run_loramoe.sh builds it: 8 LoRA experts of rank 4 (alpha
    # 32, dropout 0.05) densely routed per token on gate/up/down, with the localized balancing constraint
    # beta * CV^2 of the type-weighted importances (beta = delta = 0.1; docs/methods/loramoe.md).
    "loramoe": dict(
        num_experts=8,
        r=4,
        lora_alpha=32.0,
        lora_dropout=0.05,
        routing="soft",
        target_modules=["gate_proj", "up_proj", "down_proj"],
        aux_objectives={"loramoe": 0.1},
        localized_balance_delta=0.1,
        contrastive="none",
    ),
}
