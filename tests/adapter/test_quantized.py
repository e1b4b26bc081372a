"""Quantized bases (QLoRA-style): bitsandbytes 8-bit and 4-bit NF4 linears and torchao int8 weight-only
linears as base layers, on this CPU. The experts and routers are float32; the quantized weights are only
ever called, never de-quantised or trained; at initialisation the adapted model equals the quantized one."""

import pytest
import torch
from torch import nn

from comoe import ComoeConfig, ComoeModel, get_comoe_model
from tests.helpers import tiny_llama

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")


def bnb_linear(linear: nn.Linear, bits: int) -> nn.Module:
    """The bitsandbytes counterpart of a float linear, quantized on this device (CPU)."""
    weight = linear.weight.data.clone()
    if bits == 8:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=False, has_fp16_weights=False
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=False, quant_type="nf4", compute_dtype=torch.float32
        )
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    return layer.to("cpu")


def quantized_llama(kind: str) -> nn.Module:
    model = tiny_llama()
    if kind == "torchao-int8":
        quantization = pytest.importorskip("torchao.quantization", reason="torchao is not installed")
        is_projection = lambda module, name: isinstance(module, nn.Linear) and "proj" in name  # noqa: E731
        quantization.quantize_(model, quantization.Int8WeightOnlyConfig(), filter_fn=is_projection)
        return model.eval()
    bits = 8 if kind == "bnb-8bit" else 4
    for block in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(block.self_attn, name, bnb_linear(getattr(block.self_attn, name), bits))
    return model.eval()  # the new layers too (bitsandbytes 8-bit computes differently in training mode)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal, also for torchao's quantized tensors (compared through their de-quantised values)."""
    try:
        return torch.equal(a, b)
    except NotImplementedError:
        return torch.equal(a.dequantize(), b.dequantize())


@pytest.mark.parametrize("kind", ["bnb-8bit", "bnb-4bit", "torchao-int8"])
def test_quantized_base_trains_float32_experts_and_round_trips(kind, tmp_path):
    model = quantized_llama(kind)
    ids = torch.randint(3, 128, (4, 10), generator=torch.Generator().manual_seed(0))
    comoe = get_comoe_model(model, ComoeConfig.preset("comoe", r=4, lora_dropout=0.0))
    layer = comoe.comoe_layers()["model.layers.0.self_attn.q_proj"]
    assert layer.lora_A.dtype == layer.lora_B.dtype == layer.router.weight.dtype == torch.float32
    comoe.eval()  # an evaluation before training (bitsandbytes 4-bit would pack its weight here)
    with torch.no_grad():
        with comoe.disable_adapters():
            reference = comoe(input_ids=ids).logits
        assert torch.equal(comoe(input_ids=ids).logits, reference)  # B = 0: exactly the quantized model
    frozen = {n: p.detach().clone() for n, p in comoe.named_parameters() if not p.requires_grad}
    comoe.train()
    optimizer = torch.optim.AdamW([p for p in comoe.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = comoe(input_ids=ids, labels=ids).loss
        loss.backward()
        assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0  # (A's is 0 while B = 0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(same(p, frozen[n]) for n, p in comoe.named_parameters() if not p.requires_grad)
    comoe.save_pretrained(tmp_path)
    loaded = ComoeModel.from_pretrained(quantized_llama(kind), tmp_path)
    comoe.eval()
    with torch.no_grad():
        assert torch.allclose(comoe(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=0, rtol=0)


def test_a_4bit_layer_packed_for_inference_before_wrapping_is_reported_not_silently_frozen():
    """bitsandbytes packs a 4-bit weight for CPU inference on an eval-mode forward without gradients;
    the packed weight has no backward. Training through it must fail loudly, naming the cause."""
    model = quantized_llama("bnb-4bit")
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids)  # packs the weights (on CPUs with AVX512-BF16)
    packed = getattr(
        model.model.layers[0].self_attn.q_proj.weight.quant_state, "packing_format_for_cpu", False
    )
    if not packed:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not pack 4-bit weights here")
    comoe = get_comoe_model(model, ComoeConfig.preset("comoe", r=4)).train()
    with pytest.raises(RuntimeError, match="bitsandbytes packed for CPU inference"):
        comoe(input_ids=ids, labels=ids)


@pytest.mark.parametrize(
    ("kind", "layer_type"),
    [("bnb-8bit", "Linear8bitLt"), ("bnb-4bit", "Linear4bit"), ("torchao-int8", "Linear")],
)
def test_dora_experts_refuse_a_quantized_base_naming_its_layer_and_the_alternatives(kind, layer_type):
    """DoRA experts need W0's row norms, which comoe does not de-quantise: refused when the model is built,
    naming the bank, the base layer's type and what to do instead."""
    with pytest.raises(ValueError) as info:
        get_comoe_model(quantized_llama(kind), ComoeConfig.preset("comoe-dora", r=4))
    message = str(info.value)
    assert message.startswith(f"expert_bank='dora': the base layer {layer_type} holds its weight as ")
    assert "load the base model unquantized" in message and "expert_bank: lora" in message
