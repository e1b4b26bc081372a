"""MixLoRA's FFN-block experts (Li et al. 2024, arXiv 2404.15159): one routed mixture over a gated MLP.

Expert k of a Llama-style MLP (gate_proj W1, up_proj W3, down_proj W2, activation act) is the whole FFN
with LoRA on its three projections,

    E_k(h) = (W2 + s B2k A2k) [act((W1 + s B1k A1k) h) * ((W3 + s B3k A3k) h)],      s = alpha / r,

a router on the MLP's input h picks the top-k experts per token (gates renormalised), and the block returns
sum_k g_k E_k(h). The frozen FFN is shared (the paper's efficiency point, MoE-PEFT's `_mixlora_forward`):
W1 h and W3 h are computed once for all experts, each active (token, expert) pair adds its expert's LoRA
terms, and since W2 is linear, sum_k g_k W2 m_k = W2 (sum_k g_k m_k) is one frozen down-projection of the
gate-weighted intermediate instead of one per pair. The intermediate is accumulated as the frozen FFN's own
m0 = act(W1 h) * (W3 h) plus the gated changes sum_k g_k (m_k - m0) (gates summing to 1), so with B = 0 the
block returns the base MLP's output bit for bit.

`ComoeFFN` records like a ComoeLinear (routing, logits when asked; z and B of the down-projection's LoRA,
which are not an expert's whole output, so the contrastive objectives are refused), so the balance loss,
`record_routing()` and analysis read it unchanged. In this form the `target_modules` linears get a plain
LoRA each (`LoraLinear`: one expert, no router, no record). Supported MLPs: gate_proj / up_proj / down_proj
linears and `act_fn` (Llama, Mistral, Qwen2, Gemma, SmolLM2); anything else is refused naming the module.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from comoe.adapter.layer import ComoeContext, ComoeLinear, adapter_dtype, layer_features
from comoe.adapter.targeting import layer_index, matches
from comoe.config import ComoeConfig
from comoe.moe.banks import ExpertBank, ffn_bank, get_bank
from comoe.moe.experts import choose_strategy, mix
from comoe.moe.record import LayerRecord
from comoe.moe.routing import Router, Routing, RoutingKind, get_routing
from comoe.objectives.auxiliary import requirements

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # W1, W3, W2 of the gated MLP
# MoE-PEFT initialises MixLoRA's router N(0, router_init_range^2) with router_init_range = 0.02
# (moe_peft/adapters/mixlora/config.py); comoe's per-linear routers keep nn.Linear's initialisation.
ROUTER_INIT_STD = 0.02
SUPPORTED = (
    "a gated MLP with gate_proj, up_proj and down_proj linears and an act_fn, computing "
    "down_proj(act_fn(gate_proj(h)) * up_proj(h)) (Llama, Mistral, Qwen2, Gemma, SmolLM2)"
)


def check_gated_mlp(name: str, module: nn.Module) -> None:
    """ValueError naming `name` unless it is a gated MLP whose projections are nn.Linear layers."""
    projections = [getattr(module, p, None) for p in PROJECTIONS]
    if all(isinstance(p, nn.Linear) for p in projections) and callable(getattr(module, "act_fn", None)):
        return
    children = [f"{child} ({type(m).__name__})" for child, m in module.named_children()]
    raise ValueError(
        f"ffn_experts: {name!r} is a {type(module).__name__} with {children or 'no children'}; MixLoRA's "
        f"FFN-block experts need {SUPPORTED}. For other MLPs (GPT-2's c_fc/c_proj, fused gate_up_proj) use "
        "the per-linear preset 'mixlora', or leave ffn_experts unset"
    )


def find_ffn_modules(model: nn.Module, config: ComoeConfig) -> dict[str, nn.Module]:
    """The MLP modules config.ffn_experts names (outermost matches, within layers_to_transform), each
    checked to be a supported gated MLP; ValueError when none matches or one is not supported."""
    if not config.ffn_experts:
        return {}
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or any(name.startswith(outer + ".") for outer in found):
            continue
        if not matches(name, config.ffn_experts):
            continue
        if config.layers_to_transform is not None and layer_index(name) not in config.layers_to_transform:
            continue
        if isinstance(module, ComoeFFN):
            raise ValueError(f"ffn_experts: {name!r} is already a comoe FFN mixture; apply comoe once")
        check_gated_mlp(name, module)
        found[name] = module
    if not found:
        raise ValueError(
            f"ffn_experts={config.ffn_experts!r} matches no module of this {type(model).__name__}"
            + (
                f" (with layers_to_transform={config.layers_to_transform})"
                if config.layers_to_transform
                else ""
            )
            + f"; it names MLP modules ('mlp' in Llama-style models), each {SUPPORTED}"
        )
    return found


def check_disjoint(linears: dict[str, nn.Module], mlps: dict[str, nn.Module]) -> None:
    """ValueError when a target_modules linear lies inside an FFN-expert MLP (its projections are the
    experts'; a plain LoRA on them too would adapt them twice)."""
    inside = [name for name in linears if any(name.startswith(mlp + ".") for mlp in mlps)]
    if inside:
        raise ValueError(
            f"target_modules: {inside[:3]} lie inside the ffn_experts MLPs, whose projections are already "
            "the FFN experts' (name only the attention projections in target_modules)"
        )


def plain_config(config: ComoeConfig) -> ComoeConfig:
    """The configuration of a plain LoRA linear beside FFN experts: one LoRA expert, nothing routed."""
    return dataclasses.replace(
        config,
        num_experts=1,
        top_k=1,
        routing="topk",
        expert_bank="lora",
        experts_by_depth=None,
        ffn_experts=None,
        balance_weight=0.0,
        aux_objectives={},
        router_jitter=0.0,
    )


class NoRouting(RoutingKind):
    """The routing of a plain LoRA linear: no parameters, every token to its one expert (not registered:
    only `LoraLinear` uses it)."""

    name = "none"

    @classmethod
    def shapes(cls, num_experts: int, in_features: int) -> dict[str, tuple[int, ...]]:
        return {}

    @classmethod
    def create(cls, layer: nn.Module, factory: dict) -> None:
        return None


class LoraLinear(ComoeLinear):
    """A frozen linear plus one plain LoRA, y = W0 x + s B A dropout(x) (PEFT's LoRA, with comoe's storage:
    lora_A [1, r, d_in] Kaiming-uniform, lora_B [1, r, d_out] zero). No router and no record: the
    attention projections of MixLoRA's paper form. File keys: `lora_A`, `lora_B` under the linear's path."""

    def __init__(
        self, base_layer: nn.Module, config: ComoeConfig, context: ComoeContext, stream: str = "decoder"
    ) -> None:
        super().__init__(base_layer, plain_config(config), context, stream)
        del self.router
        self.router = None
        self.routing_kind = NoRouting

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if not self.context.adapters_enabled:
            return result
        flat = self.lora_dropout(x.reshape(-1, self.in_features).to(self.lora_A.dtype))
        delta = (flat @ self.lora_A[0].t()) @ self.lora_B[0]
        return result + (self.scaling * delta).view(result.shape).to(result.dtype)


class ExpertProjection(nn.Module):
    """The n experts' LoRA parameters of one projection of a ComoeFFN (the expert bank's: lora_A [n, r,
    d_in], lora_B [n, r, d_out] for LoRA experts). The frozen linear itself stays in the MLP."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_experts: int,
        r: int,
        bank: type[ExpertBank],
        factory: dict,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bank.create(self, num_experts, r, factory)


def ffn_shapes(
    bank: type[ExpertBank],
    routing: type[RoutingKind],
    config: ComoeConfig,
    num_experts: int,
    r: int,
    in_features: int,
    intermediate: int,
    out_features: int,
) -> dict[str, tuple[int, ...]]:
    """A ComoeFFN's parameter paths (under the MLP; also the adapter file's keys) and shapes, without
    building anything: the router's, then each projection's expert bank."""
    sizes = {
        "gate_proj": (in_features, intermediate),
        "up_proj": (in_features, intermediate),
        "down_proj": (intermediate, out_features),
    }
    shapes = dict(routing.shapes_for(config, num_experts, in_features))
    for projection, (d_in, d_out) in sizes.items():
        for key, shape in bank.shapes(num_experts, r, d_in, d_out).items():
            shapes[f"{projection}.{key}"] = shape
    return shapes


def mlp_features(mlp: nn.Module) -> tuple[int, int, int]:
    """(d, d_ff, d_out) of a gated MLP: gate_proj's input and output, down_proj's output."""
    return (*layer_features(mlp.gate_proj), layer_features(mlp.down_proj)[1])


def pair_routing(routing: Routing) -> Routing:
    """The T*k (token, active expert) pairs of a routing as T*k rows routed to one expert each with gate 1,
    so a mix strategy returns each pair's own s B_e z_e unsummed: [T*k, 1] indices and gates."""
    k = routing.indices.shape[1]
    indices = routing.indices.reshape(-1, 1)
    probs = routing.probs.detach().repeat_interleave(k, 0)
    return Routing(probs, indices, routing.gates.new_ones(indices.shape))


class ComoeFFN(nn.Module):
    """A frozen gated MLP plus n routed FFN-block experts sharing it (MixLoRA; see the module docstring).

    Parameters (file keys under the MLP's path): `router.weight` [n, d], and per projection p in gate_proj,
    up_proj, down_proj the expert bank's `p.lora_A` [n, r, d_in(p)], `p.lora_B` [n, r, d_out(p)]. The
    original MLP is `base_layer`. Shapes: h [..., d] -> [..., d]."""

    def __init__(
        self, mlp: nn.Module, config: ComoeConfig, context: ComoeContext, stream: str = "decoder"
    ) -> None:
        super().__init__()
        check_gated_mlp(type(mlp).__name__, mlp)
        needs = requirements(config)
        unsupported = sorted(needs & {"gram", "norm_floor"})
        if unsupported:
            raise ValueError(
                f"aux_objectives: {sorted(config.objective_weights)} need {unsupported} of experts of the "
                "form B_i A_i x, which FFN-block experts (ffn_experts) are not; use routing objectives "
                "(balance, router_z) with them"
            )
        self.base_layer = mlp
        self.config = config  # read by routing kinds whose router depends on more than n, d_in
        self.in_features, self.intermediate_features, self.out_features = mlp_features(mlp)
        self.num_experts, self.top_k, self.r = config.num_experts, config.top_k, config.r
        self.scaling = config.scaling
        self.normalize_gates = config.normalize_gates
        # the built-in routings whose gates sum to 1 by construction; any other kind's sum is used as computed
        self.unit_gates = config.routing == "soft" or (config.routing == "topk" and config.normalize_gates)
        self.expert_compute = config.expert_compute
        if self.expert_compute != "auto":
            choose_strategy(self.expert_compute, self.num_experts, config.active_experts)  # registered?
        self.keep_logits = "logits" in needs
        self.router_jitter = config.router_jitter
        self.context = context
        self.stream = stream
        factory = dict(device=mlp.gate_proj.weight.device, dtype=adapter_dtype(config, mlp.gate_proj))
        self.routing_kind = get_routing(config.routing)
        self.routing_kind.create(self, factory)
        if isinstance(getattr(self, "router", None), Router):
            nn.init.normal_(self.router.weight, mean=0.0, std=ROUTER_INIT_STD)
        self.bank = ffn_bank(config.expert_bank)
        d, d_ff, n, r = self.in_features, self.intermediate_features, self.num_experts, self.r
        self.gate_proj = ExpertProjection(d, d_ff, n, r, self.bank, factory)
        self.up_proj = ExpertProjection(d, d_ff, n, r, self.bank, factory)
        self.down_proj = ExpertProjection(d_ff, self.out_features, n, r, self.bank, factory)
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.record: LayerRecord | None = None

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter's parameters by path under the MLP (the keys of `ffn_shapes`)."""
        d, d_ff, d_out = self.in_features, self.intermediate_features, self.out_features
        keys = ffn_shapes(self.bank, self.routing_kind, self.config, self.num_experts, self.r, d, d_ff, d_out)
        return {key: self.get_parameter(key) for key in keys}

    @property
    def active_experts(self) -> int:
        """Experts that may contribute to a token: top_k, or all of them with a dense routing kind."""
        return self.num_experts if self.routing_kind.dense else self.top_k

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mlp = self.base_layer
        gate_out, up_out = mlp.gate_proj(h), mlp.up_proj(h)
        hidden = mlp.act_fn(gate_out) * up_out  # the frozen FFN's intermediate m0, shared by every expert
        if not self.context.adapters_enabled:
            return mlp.down_proj(hidden)
        d_ff = self.intermediate_features
        flat = h.reshape(-1, self.in_features).to(self.router.weight.dtype)
        router_input = self._jittered(flat) if self.router_jitter > 0 and self.training else flat
        logits, routing = self.routing_kind.route(self, router_input)
        num_tokens, k = routing.indices.shape
        pairs = pair_routing(routing)
        # one strategy for the block, chosen for the token-level n / k (the pairs route to 1 expert each)
        strategy = choose_strategy(self.expert_compute, self.num_experts, k, flat.device.type)
        x = self.lora_dropout(flat)
        dtype = hidden.dtype
        base = hidden.reshape(-1, d_ff)
        pre_gate = gate_out.reshape(-1, d_ff).repeat_interleave(k, 0) + self._pair_delta(
            self.gate_proj, x, pairs, dtype, strategy
        )
        pre_up = up_out.reshape(-1, d_ff).repeat_interleave(k, 0) + self._pair_delta(
            self.up_proj, x, pairs, dtype, strategy
        )
        m = mlp.act_fn(pre_gate) * pre_up  # [T*k, d_ff] each pair's expert intermediate
        gates = routing.gates.to(dtype)
        change = ((m - base.repeat_interleave(k, 0)).view(num_tokens, k, d_ff) * gates.unsqueeze(-1)).sum(1)
        gate_sum = None if self.unit_gates else gates.sum(-1, keepdim=True)
        mixed = base + change if gate_sum is None else base * gate_sum + change
        result = mlp.down_proj(mixed)  # W2 sum_k g_k m_k (+ b once)
        bias = getattr(mlp.down_proj, "bias", None)
        if gate_sum is not None and bias is not None:  # sum_k g_k b = (sum g) b
            result = result + (gate_sum - 1) * bias
        # the down-projection's LoRA: each pair's own expert's A2 m_k, placed in that expert's slot
        m_in = self.lora_dropout(m.to(flat.dtype))
        z_pairs = self.bank.down_project(self.down_proj, m_in).view(num_tokens, k, self.num_experts, self.r)
        own = torch.zeros(num_tokens, k, self.num_experts, dtype=z_pairs.dtype, device=z_pairs.device)
        own.scatter_(2, routing.indices.unsqueeze(-1), 1.0)
        z_down = (z_pairs * own.unsqueeze(-1)).sum(1)  # [T, n, r], zero for inactive experts
        lora_B = self.bank.up_weight(self.down_proj)
        delta = mix(z_down, routing, lora_B, self.scaling, strategy)
        if self.context.keep_records:
            kept = logits if self.keep_logits else None
            self.record = LayerRecord(routing, z_down, None, lora_B, logits=kept)
        out = result.reshape(-1, self.out_features) + delta.to(result.dtype)
        return out.view(*h.shape[:-1], self.out_features)

    def _pair_delta(
        self,
        projection: ExpertProjection,
        x: torch.Tensor,
        pairs: Routing,
        dtype: torch.dtype,
        strategy: str,
    ) -> torch.Tensor:
        """s B_e A_e x_t for each (token t, expert e) pair, in `dtype`: [T, d_in] -> [T*k, d_out]."""
        k = pairs.indices.shape[0] // x.shape[0]
        z = self.bank.down_project(projection, x).repeat_interleave(k, 0)  # [T*k, n, r]
        return mix(z, pairs, self.bank.up_weight(projection), self.scaling, strategy).to(dtype)

    _jittered = ComoeLinear._jittered

    def extra_repr(self) -> str:
        return f"ffn_experts={self.num_experts}, top_k={self.top_k}, r={self.r}, scaling={self.scaling:g}"


def mixlora_shapes(
    linears: dict[str, nn.Module], mlps: dict[str, nn.Module], config: ComoeConfig, num_blocks: int
) -> dict[str, tuple[int, ...]]:
    """The adapter file's names and shapes with ffn_experts, without building anything: a plain LoRA per
    target linear (lora_A [1, r, d_in], lora_B [1, r, d_out]) and each MLP's FFN experts (`ffn_shapes`, with
    experts_by_depth's count for its block among `num_blocks`)."""
    plain = get_bank("lora")
    shapes = {}
    for name, linear in linears.items():
        for key, shape in plain.shapes(1, config.r, *layer_features(linear)).items():
            shapes[f"{name}.{key}"] = shape
    bank, routing = ffn_bank(config.expert_bank), get_routing(config.routing)
    for name, mlp in mlps.items():
        n = config.experts_at(layer_index(name), num_blocks)
        block_config = config.at_depth(layer_index(name), num_blocks)
        for key, shape in ffn_shapes(bank, routing, block_config, n, config.r, *mlp_features(mlp)).items():
            shapes[f"{name}.{key}"] = shape
    return shapes
