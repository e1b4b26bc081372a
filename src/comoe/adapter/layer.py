"""ComoeLinear: a frozen nn.Linear plus a routed mixture of LoRA experts.

    y = W0 x + sum_{i in topk(g(x))} g_i(x) * (alpha / r) * B_i A_i x,   g = softmax(W_g x)

The experts' parameters are laid out by the configured expert bank (comoe.moe.banks; LoRA experts by
default: A [n, r, d_in], B [n, r, d_out], B zero-initialised, so at initialisation the layer returns
exactly the base layer's output) and the up-projection runs through a mix strategy (comoe.moe.experts).
When the model asks for it (auxiliary losses, `record_routing()`), each call also leaves its routing, the
experts' down-projections and what the active objectives need in `self.record` (a LayerRecord without a
token mask: the model knows each layer's token stream and attaches the mask); the model clears it after
every forward.

The base layer is any module computing x W^T + b: nn.Linear, its quantized forms (bitsandbytes 8-bit and
4-bit linears and torchao-quantized weights are nn.Linear subclasses or tensor subclasses), and GPT-2's
Conv1D (x W + b, its weight stored transposed). Only its forward is called, so it never has to be
de-quantised; experts and router live in `adapter_dtype` (float32 by default, as PEFT keeps adapters) and
their output is cast to the base output's dtype.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from comoe.config import ComoeConfig
from comoe.moe.banks import get_bank
from comoe.moe.experts import choose_strategy, expert_gram, gram_in_forward, mix
from comoe.moe.fused import autocasting, fuses, linear_mix_inference, linear_route_and_mix, route_and_mix
from comoe.moe.record import LayerRecord
from comoe.moe.routing import get_routing
from comoe.objectives.auxiliary import requirements


class ComoeContext:
    """What the model sets for all its layers (a plain object, not a module): whether the adapters are on,
    whether this forward's layers keep a record for the losses or analysis, and `call_inputs`, the call's
    per-call routing inputs by name (e.g. "task_ids" [B]: RoutingKind.inputs), replaced at every call
    (kept after it, so that gradient checkpointing's recomputation in the backward sees them)."""

    def __init__(self) -> None:
        self.keep_records = False
        self.adapters_enabled = True
        self.call_inputs: dict[str, torch.Tensor] = {}


ADAPTABLE = (nn.Linear, Conv1D)  # the base layers a ComoeLinear wraps (quantized linears included)


def layer_features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an adaptable layer; Conv1D stores its weight [in, out]."""
    if isinstance(layer, Conv1D):
        return layer.nx, layer.nf
    return layer.in_features, layer.out_features


def adapter_dtype(config: ComoeConfig, base_layer: nn.Module) -> torch.dtype:
    """The experts' and router's dtype: config.adapter_dtype, 'base' meaning the base weight's dtype when
    it is a float dtype (a quantized weight's int8/uint8 storage is not), float32 otherwise."""
    if config.adapter_dtype != "base":
        return getattr(torch, config.adapter_dtype)
    dtype = base_layer.weight.dtype
    return dtype if dtype.is_floating_point else torch.float32


def _packed_for_inference(layer: nn.Module) -> bool:
    """A bitsandbytes 4-bit weight in its CPU inference layout (no backward through it)."""
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def base_weight(base_layer: nn.Module) -> torch.Tensor:
    """The base layer's weight W0 as [d_out, d_in] (a view; Conv1D's stored [d_in, d_out] transposed), for the
    expert banks that read it (DoRA experts' norms). A quantized weight (bitsandbytes' Int8Params and
    Params4bit, torchao's tensor subclasses: anything but a plain float tensor) is refused with a ValueError
    naming the layer type: comoe does not de-quantise it."""
    weight = base_layer.weight
    if type(weight) not in (torch.Tensor, nn.Parameter) or not weight.dtype.is_floating_point:
        raise ValueError(
            f"the base layer {type(base_layer).__name__} holds its weight as {type(weight).__name__} of "
            f"dtype {weight.dtype} (quantized), which comoe does not de-quantise, and this expert bank reads "
            "W0: load the base model unquantized (float32, bfloat16 or float16), or choose an expert bank "
            "that only calls the base layer (expert_bank: lora, hydra, omoe)"
        )
    return weight.t() if isinstance(base_layer, Conv1D) else weight


class ComoeLinear(nn.Module):
    """A frozen linear layer plus n routed LoRA experts (an expert bank: A [n, r, d_in], B [n, r, d_out]
    for LoRA experts) and a router. `stream` names the token stream the layer's input belongs to
    ('decoder', or 'encoder' in encoder-decoder models), which chooses its token mask."""

    def __init__(
        self, base_layer: nn.Module, config: ComoeConfig, context: ComoeContext, stream: str = "decoder"
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, ADAPTABLE):
            raise TypeError(
                f"ComoeLinear adapts nn.Linear and Conv1D layers, got {type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        if hasattr(base_layer, "support_avx512bf16_for_cpu"):
            # bitsandbytes' Linear4bit repacks its weight for CPU inference on its first eval-mode forward
            # without gradients (e.g. a validation pass), and the packed weight has no backward: every later
            # training step would lose the gradient through this layer. Keep it in the trainable format.
            base_layer.support_avx512bf16_for_cpu = False
        self.in_features, self.out_features = layer_features(base_layer)
        self.num_experts, self.top_k, self.r = config.num_experts, config.top_k, config.r
        self.scaling = config.scaling
        self.config = config  # this layer's configuration (kinds whose router depends on more than n, d_in)
        self.routing_kind = get_routing(config.routing)
        self.normalize_gates = config.normalize_gates
        self.expert_compute = config.expert_compute
        if self.expert_compute != "auto":
            choose_strategy(self.expert_compute, self.num_experts, self.active_experts)  # registered?
        needs = requirements(config)  # what the active objectives ask each forward to keep
        self.needs_gram = "gram" in needs
        self.norm_floor = config.contrastive_norm_floor if "norm_floor" in needs else 0.0
        self.keep_logits = "logits" in needs
        self.router_jitter = config.router_jitter
        self.context = context
        self.stream = stream
        factory = dict(device=base_layer.weight.device, dtype=adapter_dtype(config, base_layer))
        self.routing_kind.create(self, factory)  # self.router (and any further router parameters)
        self.bank = get_bank(config.expert_bank)
        self.bank.create(self, self.num_experts, self.r, factory)  # lora_A, lora_B for LoRA experts
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.record: LayerRecord | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and _packed_for_inference(self.base_layer):
            raise RuntimeError(
                f"the base layer {type(self.base_layer).__name__} has a weight that bitsandbytes packed for "
                "CPU inference (an eval-mode forward without gradients ran before comoe wrapped it), which "
                "has no backward: the experts below it would get no gradient. Load the base model again "
                "and wrap it before running it"
            )
        result = self.base_layer(x)
        if not self.context.adapters_enabled:
            return result
        flat = x.reshape(-1, self.in_features).to(self.router.weight.dtype)
        router_input = self._jittered(flat) if self.router_jitter > 0 and self.training else flat
        device_type = flat.device.type
        strategy = choose_strategy(self.expert_compute, self.num_experts, self.active_experts, device_type)
        fused = self.bank.outputs_are_lora and fuses(self.routing_kind, strategy)  # moe/fused.py
        # router, down- and up-projection in one autograd Function (not under autocast: its dtypes)
        down_weight = None
        if fused and not autocasting(device_type):
            down_weight = self.bank.down_weight(self)
        if down_weight is None and fused:
            logits = self.router(router_input)
        elif down_weight is None:
            logits, routing = self.routing_kind.route(self, router_input)
        dropped = self.lora_dropout(flat)
        lora_B = self.bank.up_weight(self)
        if down_weight is not None:
            x_down = None if dropped is router_input else dropped
            soft, normalize = self.routing_kind.dense, self.normalize_gates
            if x_down is None and not (self.training or torch.is_grad_enabled() or self.context.keep_records):
                delta = linear_mix_inference(  # inference: no Function, no routing kept, fewer ops
                    flat, self.router.weight, down_weight, lora_B, self.scaling, self.top_k, soft, normalize
                )
                return result + delta.view(result.shape).to(result.dtype)
            delta, logits, z, routing = linear_route_and_mix(
                router_input, self.router.weight, down_weight, lora_B, x_down, self.scaling, self.top_k, soft,
                normalize,
            )  # fmt: skip
        else:
            z = self.bank.down_project(self, dropped)
        if lora_B.dtype != z.dtype:  # under torch.autocast z comes out in the autocast dtype, B does not
            lora_B = lora_B.to(z.dtype)
        outputs = None  # every expert's output [T, n, d_out], from a bank whose outputs are not s B^T z
        if down_weight is not None:
            pass  # the adapter term came with z above
        elif fused:  # route + blocks in one autograd Function: fewer dispatched ops
            soft, normalize = self.routing_kind.dense, self.normalize_gates
            delta, routing = route_and_mix(logits, z, lora_B, self.scaling, self.top_k, soft, normalize)
        elif self.bank.outputs_are_lora:
            delta = mix(z, routing, lora_B, self.scaling, strategy)
        else:  # materialised for the objectives, in every training forward alike (checkpointing, below)
            materialise = self.needs_gram if self.training else self.context.keep_records
            base = result.reshape(-1, self.out_features)
            delta, outputs = self.bank.routed_output(self, dropped, z, routing, base, materialise)
        # The objectives' extra tensors are computed in every training forward, whether or not this call
        # keeps a record: gradient checkpointing re-runs the forward during backward (when the model no
        # longer asks for records) and requires it to save exactly the tensors the first run saved.
        gram, base_norm = None, None
        if self.training or self.context.keep_records:
            if self.needs_gram and outputs is None and gram_in_forward():  # else the objectives take it
                gram = expert_gram(lora_B)
            if self.norm_floor > 0:  # |W0 x| per token sets the scale below which an output is ~zero
                with torch.no_grad():  # a scale without gradient (no_grad: no detach op to dispatch)
                    wide = None if result.dtype == torch.float64 else torch.float32  # float32 at least
                    base_norm = torch.linalg.vector_norm(result, dim=-1, dtype=wide)
        if self.context.keep_records:
            kept = logits if self.keep_logits else None
            # the floor in z-space for the Gram path (output floor / s), in output space for materialised
            # outputs
            scale = self.norm_floor if outputs is not None else self.norm_floor / self.scaling
            self.record = LayerRecord(
                routing, z, None, lora_B, gram, base_norm, kept, outputs=outputs, floor_scale=scale
            )
        return result + delta.view(result.shape).to(result.dtype)

    def _jittered(self, flat: torch.Tensor) -> torch.Tensor:
        """The router's input times noise drawn uniformly from [1 - eps, 1 + eps] per element, eps =
        router_jitter: the Switch Transformer's multiplicative input jitter (Fedus et al. 2021, arXiv
        2101.03961; eps = 1e-2 there), one of the stability techniques ST-MoE (arXiv 2202.08906) compares.
        Only the router sees it; the experts see the input unchanged."""
        noise = torch.empty_like(flat).uniform_(1.0 - self.router_jitter, 1.0 + self.router_jitter)
        return flat * noise

    def base_weight(self) -> torch.Tensor:
        """W0 [d_out, d_in] of the base layer (see `base_weight`), for banks that read it; ValueError naming
        the expert bank for a quantized base."""
        try:
            return base_weight(self.base_layer)
        except ValueError as error:
            raise ValueError(f"expert_bank={self.bank.name!r}: {error}") from None

    @property
    def active_experts(self) -> int:
        """Experts that may contribute to a token: top_k, or all of them with a dense routing kind."""
        return self.num_experts if self.routing_kind.dense else self.top_k

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, r={self.r}, scaling={self.scaling:g}"
