"""vLLM model classes that serve a comoe adapter: each family's own vLLM class with the routed experts added
to its linear layers, no base weight renamed or copied.

`ComoeLlamaForCausalLM` (and the Mistral, Qwen2 and Gemma families' classes) is vLLM's class plus, after
its __init__, one `PackedMixture` (comoe_vllm.mixture) on each vLLM linear that holds an adapted Hugging
Face linear: the packed QKV and gate/up projections carry their q/k/v and gate/up slices' experts, the
row-parallel o/down projections theirs. The layer keeps its class's forward and adds the experts' output
(its class is swapped for a subclass whose forward does that), so vLLM's weight loading, sharding, kernels
and torch.compile see the layers they know. The adapter folder comes from the model's Hugging Face config:
`hf_overrides={"architectures": ["ComoeLlamaForCausalLM"], "comoe_adapter": DIR}`.

A compiled graph depends on the adapter (its targets, k, routing, scaling), which vLLM's compile-cache key
does not see (hf_overrides is left out of it): the adapter's fingerprint goes into
`vllm_config.additional_config`, which the key hashes, before the base class builds (and compiles) anything.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.models.gemma import GemmaForCausalLM
from vllm.model_executor.models.gemma2 import Gemma2ForCausalLM
from vllm.model_executor.models.gemma3 import Gemma3ForCausalLM
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from comoe_vllm.adapter import ALTERNATIVE, ComoeAdapter, Experts
from comoe_vllm.mixture import PackedMixture, Slice

logger = logging.getLogger("comoe_vllm")

ADAPTER_KEY = "comoe_adapter"  # the Hugging Face config attribute (hf_overrides) naming the folder
FINGERPRINT_KEY = "comoe_adapter_fingerprint"  # additional_config entry: part of the compile-cache key


def adapter_of(vllm_config: VllmConfig) -> ComoeAdapter:
    """The adapter folder the model's config names (hf_overrides' comoe_adapter), read."""
    hf_config = vllm_config.model_config.hf_config
    path = getattr(hf_config, ADAPTER_KEY, None)
    if not path:
        raise ValueError(
            f"{type(hf_config).__name__} has no '{ADAPTER_KEY}': pass the adapter folder with "
            f'--hf-overrides \'{{"architectures": [...], "{ADAPTER_KEY}": "DIR"}}\' (or use `comoe serve`)'
        )
    return ComoeAdapter.read(path)


def check_base(vllm_config: VllmConfig) -> None:
    """Refuse a quantized base (its linears' forward is another kernel; the mixture would run, but the
    adapter was trained against the unquantized or bitsandbytes-quantized weights, not these)."""
    quantization = vllm_config.model_config.quantization
    if quantization or vllm_config.quant_config is not None:
        raise ValueError(
            f"quantization={quantization!r}: quantized bases are not served by comoe-vllm yet; serve the "
            f"unquantized base, or {ALTERNATIVE}"
        )


def record_fingerprint(vllm_config: VllmConfig, adapter: ComoeAdapter) -> None:
    extra = vllm_config.additional_config
    if isinstance(extra, dict):
        extra[FINGERPRINT_KEY] = adapter.fingerprint
    else:  # a SupportsHash object: its own hash is the key's; comoe cannot add to it
        raise ValueError(
            "additional_config is not a dict: comoe-vllm records the adapter's fingerprint there so that a "
            "compiled graph is never reused for another adapter"
        )


def serving_targets(
    model: nn.Module, adapter: ComoeAdapter
) -> dict[str, dict[int | None, tuple[str, Experts]]]:
    """vLLM layer path -> {slice index (None: the whole layer): (HF module path, experts)}, through the
    model's packed_modules_mapping (qkv_proj: [q_proj, k_proj, v_proj], gate_up_proj: [gate_proj,
    up_proj])."""
    packed = getattr(model, "packed_modules_mapping", {}) or {}
    slot = {leaf: (name, index) for name, leaves in packed.items() for index, leaf in enumerate(leaves)}
    modules = dict(model.named_modules())
    targets: dict[str, dict[int | None, tuple[str, Experts]]] = {}
    for hf_name, experts in adapter.experts.items():
        parent, _, leaf = hf_name.rpartition(".")
        if hf_name in modules:
            layer, index = hf_name, None
        elif leaf in slot:
            layer, index = f"{parent}.{slot[leaf][0]}", slot[leaf][1]
        else:
            layer, index = hf_name, None
        if not isinstance(modules.get(layer), LinearBase):
            raise ValueError(
                f"{adapter.path}: the adapted linear {hf_name!r} has no vLLM linear layer in "
                f"{type(model).__name__} (looked for {layer!r}); the adapter is for another model family, "
                f"or {ALTERNATIVE}"
            )
        targets.setdefault(layer, {})[index] = (hf_name, experts)
    return targets


def _check_shape(hf_name: str, experts: Experts, d_in: int, d_out: int) -> None:
    if (experts.in_features, experts.out_features) != (d_in, d_out):
        raise ValueError(
            f"{hf_name}: the adapter's experts map {experts.in_features} -> {experts.out_features} features, "
            f"the served model's linear {d_in} -> {d_out}: the adapter was trained on another base model"
        )


def _qkv_slices(layer: QKVParallelLinear, parts: dict[int | None, tuple[str, Experts]]) -> list[Slice]:
    q = layer.num_heads * layer.head_size
    k = layer.num_kv_heads * layer.head_size
    v = layer.num_kv_heads * layer.v_head_size
    kv_rank = layer.tp_rank // layer.num_kv_head_replicas
    local = [(layer.tp_rank * q, q, 0), (kv_rank * k, k, q), (kv_rank * v, v, q + k)]
    totals = [
        layer.total_num_heads * layer.head_size,
        layer.total_num_kv_heads * layer.head_size,
        layer.total_num_kv_heads * layer.v_head_size,
    ]
    return _column_slices(layer, parts, local, totals)


def _merged_slices(layer: MergedColumnParallelLinear, parts: dict) -> list[Slice]:
    sizes = [size // layer.tp_size for size in layer.output_sizes]
    local = [(layer.tp_rank * size, size, sum(sizes[:i])) for i, size in enumerate(sizes)]
    return _column_slices(layer, parts, local, list(layer.output_sizes))


def _column_slices(layer: LinearBase, parts: dict, local: list[tuple[int, int, int]], totals: list[int]):
    slices = []
    for index, (hf_name, experts) in sorted(
        parts.items(), key=lambda item: -1 if item[0] is None else item[0]
    ):
        if index is None:
            raise ValueError(f"{hf_name}: a whole packed layer adapted as one linear is not served")
        start, size, offset = local[index]
        _check_shape(hf_name, experts, layer.input_size, totals[index])
        slices.append(Slice(experts, slice(start, start + size), offset))
    return slices


def mixture_for(layer: LinearBase, parts: dict[int | None, tuple[str, Experts]], adapter: ComoeAdapter):
    """The PackedMixture of one vLLM linear, sharded for its tensor-parallel rank."""
    device = next(layer.parameters()).device
    routing = adapter.routing
    if isinstance(layer, QKVParallelLinear):
        return PackedMixture(
            _qkv_slices(layer, parts), layer.output_size_per_partition, routing, None, device
        )
    if isinstance(layer, MergedColumnParallelLinear):
        return PackedMixture(
            _merged_slices(layer, parts), layer.output_size_per_partition, routing, None, device
        )
    ((index, (hf_name, experts)),) = parts.items()
    if isinstance(layer, ColumnParallelLinear):
        if layer.gather_output and layer.tp_size > 1:
            raise ValueError(f"{hf_name}: a column-parallel layer that gathers its output is not served")
        size = layer.output_size_per_partition
        _check_shape(hf_name, experts, layer.input_size, layer.output_size)
        part = Slice(experts, slice(layer.tp_rank * size, (layer.tp_rank + 1) * size), 0)
        return PackedMixture([part], size, routing, None, device)
    if isinstance(layer, RowParallelLinear):
        _check_shape(hf_name, experts, layer.input_size, layer.output_size)
        if layer.tp_size == 1 or not layer.input_is_parallel:
            return PackedMixture([Slice(experts, slice(None), 0)], layer.output_size, routing, None, device)
        if not layer.reduce_results:
            raise ValueError(f"{hf_name}: a row-parallel layer that does not reduce its output is not served")
        size = layer.input_size_per_partition
        part = Slice(experts, slice(None), 0, slice(layer.tp_rank * size, (layer.tp_rank + 1) * size))
        return PackedMixture([part], layer.output_size, routing, tensor_model_parallel_all_reduce, device)
    if isinstance(layer, ReplicatedLinear):
        _check_shape(hf_name, experts, layer.input_size, layer.output_size)
        return PackedMixture([Slice(experts, slice(None), 0)], layer.output_size, routing, None, device)
    raise ValueError(f"{hf_name}: vLLM layer {type(layer).__name__} is not served; {ALTERNATIVE}")


_ADAPTED_CLASSES: dict[type, type] = {}


def adapted_class(base: type) -> type:
    """`base` (a vLLM linear class) with a forward that adds `self.comoe(x)` to the base output."""
    if base not in _ADAPTED_CLASSES:
        base_forward = base.forward

        def forward(self: Any, input_: Any) -> Any:
            result = base_forward(self, input_)
            output = result[0] if isinstance(result, tuple) else result
            output = output + self.comoe(input_).to(output.dtype).view(output.shape)
            return (output, *result[1:]) if isinstance(result, tuple) else output

        _ADAPTED_CLASSES[base] = type(f"Comoe{base.__name__}", (base,), {"forward": forward})
    return _ADAPTED_CLASSES[base]


def attach(model: nn.Module, adapter: ComoeAdapter) -> int:
    """Add the adapter's experts to the model's vLLM linears; returns how many layers carry experts."""
    modules = dict(model.named_modules())
    targets = serving_targets(model, adapter)
    for name, parts in targets.items():
        layer = modules[name]
        layer.comoe = mixture_for(layer, parts, adapter)
        layer.__class__ = adapted_class(type(layer))
    logger.info(
        "comoe adapter %s: experts on %d vLLM linears (%d adapted linears)",
        adapter.path,
        len(targets),
        len(adapter.experts),
    )
    return len(targets)


def comoe_class(base: type) -> type:
    """vLLM's model class `base` serving the comoe adapter its config names (see the module)."""

    class Comoe(base):  # type: ignore[misc, valid-type]
        def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
            check_base(vllm_config)
            adapter = adapter_of(vllm_config)
            record_fingerprint(vllm_config, adapter)  # before the base class builds its compiled modules
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            attach(self, adapter)

    Comoe.__name__ = Comoe.__qualname__ = f"Comoe{base.__name__}"
    return Comoe


ComoeLlamaForCausalLM = comoe_class(LlamaForCausalLM)
ComoeMistralForCausalLM = comoe_class(MistralForCausalLM)
ComoeQwen2ForCausalLM = comoe_class(Qwen2ForCausalLM)
ComoeGemmaForCausalLM = comoe_class(GemmaForCausalLM)
ComoeGemma2ForCausalLM = comoe_class(Gemma2ForCausalLM)
ComoeGemma3ForCausalLM = comoe_class(Gemma3ForCausalLM)
