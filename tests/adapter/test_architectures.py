"""comoe on every family a PEFT user brings (tiny random configs): default targets resolved per
architecture, forward/backward, a loss that falls, save/load bit-identical; GPT-2's Conv1D exact; a
classification head trained through modules_to_save; gradient checkpointing with equal gradients; bf16
bases with float32 experts."""

import copy

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.pytorch_utils import Conv1D

from comoe import ComoeConfig, ComoeModel, get_comoe_model
from comoe.adapter.layer import ComoeLinear
from tests.helpers import TINY_SIZES, tiny_config

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
SIZES = {k: v for k, v in TINY_SIZES.items() if k != "num_key_value_heads"}


def gpt2():
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128))


def neox():
    return GPTNeoXForCausalLM(GPTNeoXConfig(**SIZES, rotary_pct=1.0))


def bert():
    config = BertConfig(**SIZES, num_labels=3, type_vocab_size=2)
    return BertForSequenceClassification(config)


def t5():
    config = T5Config(
        vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4, decoder_start_token_id=0
    )
    return T5ForConditionalGeneration(config)


# family: (constructor, resolved default targets, config overrides)
FAMILIES = {
    "llama": (lambda: LlamaForCausalLM(tiny_config()), ATTENTION, {}),
    "qwen2": (lambda: Qwen2ForCausalLM(Qwen2Config(**TINY_SIZES)), ATTENTION, {}),
    "qwen3": (lambda: Qwen3ForCausalLM(Qwen3Config(**TINY_SIZES, head_dim=16)), ATTENTION, {}),
    "mistral": (lambda: MistralForCausalLM(MistralConfig(**TINY_SIZES)), ATTENTION, {}),
    "gemma2": (lambda: Gemma2ForCausalLM(Gemma2Config(**TINY_SIZES, head_dim=16)), ATTENTION, {}),
    "gemma3": (lambda: Gemma3ForCausalLM(Gemma3TextConfig(**TINY_SIZES, head_dim=16)), ATTENTION, {}),
    "phi3": (lambda: Phi3ForCausalLM(Phi3Config(**TINY_SIZES, pad_token_id=0)), ["o_proj", "qkv_proj"], {}),
    "gpt2": (gpt2, ["c_attn"], {}),
    "gpt_neox": (neox, ["query_key_value"], {}),
    "bert-classification": (bert, ["query", "value"], {"modules_to_save": ["classifier"]}),
    "t5": (t5, ["q", "v"], {}),
}


def build(family: str, seed: int = 0):
    torch.manual_seed(seed)
    constructor, _, overrides = FAMILIES[family]
    return constructor().eval(), ComoeConfig.preset("comoe", r=4, lora_dropout=0.0, **overrides)


def batch_for(family: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (4, 12), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family == "bert-classification":
        batch["labels"] = torch.tensor([0, 1, 2, 1])
    elif family == "t5":
        batch["labels"] = torch.randint(3, 128, (4, 6), generator=generator)
    else:
        batch["labels"] = ids
    return batch


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_injects_trains_and_round_trips(family, tmp_path):
    model, config = build(family)
    comoe = get_comoe_model(model, config)
    assert comoe.comoe_config.target_modules == FAMILIES[family][1]
    assert comoe.comoe_layers()
    batch = batch_for(family)
    comoe.train()
    trainable = [p for p in comoe.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(6):
        loss = comoe(**batch).loss
        loss.backward()
        assert all(p.grad is not None for p in trainable)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses
    comoe.save_pretrained(tmp_path)
    fresh, _ = build(family)
    loaded = ComoeModel.from_pretrained(fresh, tmp_path)
    assert loaded.comoe_config.target_modules == FAMILIES[family][1]
    comoe.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels" or family == "t5"}
    with torch.no_grad():
        assert torch.equal(comoe(**inputs).logits, loaded(**inputs).logits)


def test_classification_head_is_trained_saved_and_restored_by_disable_adapters(tmp_path):
    model, config = build("bert-classification")
    original = copy.deepcopy(model.classifier.weight)
    comoe = get_comoe_model(model, config)
    assert model.classifier.weight.requires_grad  # the trained copy
    comoe.train()
    loss = comoe(**batch_for("bert-classification")).loss
    loss.backward()
    torch.optim.SGD([p for p in comoe.parameters() if p.requires_grad], lr=0.1).step()
    assert not torch.equal(model.classifier.weight, original)
    assert any(".trained_module." in name for name in comoe.adapter_state_dict())
    comoe.eval()
    batch = {k: v for k, v in batch_for("bert-classification").items() if k != "labels"}
    base = copy.deepcopy(build("bert-classification")[0])
    with torch.no_grad(), comoe.disable_adapters():
        assert torch.equal(comoe(**batch).logits, base(**batch).logits)


def test_conv1d_layer_is_exact_against_a_reference():
    """GPT-2's Conv1D computes x W + b (weight [in, out]): at init the layer equals it, after training
    steps it equals the base plus the dense mixture of experts."""
    torch.manual_seed(0)
    base = Conv1D(48, 32)
    config = ComoeConfig(num_experts=4, top_k=2, r=4, lora_dropout=0.0, target_modules=["c"])
    from comoe.adapter.layer import ComoeContext

    layer = ComoeLinear(base, config, ComoeContext())
    x = torch.randn(5, 7, 32)
    assert torch.equal(layer(x), base(x))
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(3):
        layer(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    flat = x.reshape(-1, 32).double()
    probs = torch.softmax(flat @ layer.router.weight.double().t(), dim=-1)
    top, idx = probs.topk(2, dim=-1)
    gates = torch.zeros_like(probs).scatter(1, idx, top / top.sum(-1, keepdim=True))
    outs = torch.einsum("td,nrd,nro->tno", flat, layer.lora_A.double(), layer.lora_B.double())
    expected = (
        flat @ base.weight.double() + base.bias.double() + layer.scaling * (outs * gates[..., None]).sum(1)
    )
    assert layer.lora_B.abs().max() > 0
    torch.testing.assert_close(layer(x).double().reshape(-1, 48), expected, rtol=1e-5, atol=1e-5)


def test_fused_projections_are_adapted_whole_and_missing_targets_are_named():
    model, _ = build("phi3")
    with pytest.warns(UserWarning, match=r"\['q_proj'\] match nothing in this Phi3ForCausalLM.*qkv_proj"):
        get_comoe_model(model, ComoeConfig.preset("comoe", target_modules=["q_proj", "o_proj"]))


@pytest.mark.parametrize("preset", ["comoe", "moelora", "moe", "mixlora"])
def test_gradient_checkpointing_gives_the_same_gradients(preset):
    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_config(num_hidden_layers=3))
        comoe = get_comoe_model(model, ComoeConfig.preset(preset, r=4, contrastive_weight=1.0))
        with torch.no_grad():
            for layer in comoe.comoe_layers().values():
                layer.lora_B.normal_(0, 0.1)  # non-zero experts: every objective has a gradient
        if checkpointing:
            comoe.gradient_checkpointing_enable()
        comoe.train()
        torch.manual_seed(1)  # the same dropout masks
        comoe(**batch_for("llama")).loss.backward()
        return {n: p.grad.clone() for n, p in comoe.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_reentrant_checkpointing_is_refused_with_auxiliary_losses():
    comoe = get_comoe_model(LlamaForCausalLM(tiny_config()), ComoeConfig.preset("comoe", r=4))
    with pytest.raises(ValueError, match="use_reentrant=True runs the blocks without autograd"):
        comoe.gradient_checkpointing_enable({"use_reentrant": True})


def test_bf16_base_keeps_float32_experts_and_matches_the_float32_model():
    """A bf16 base (weights and activations) with float32 experts and router: the loss and the auxiliary
    losses agree with the all-float32 model within 2% (bf16 keeps ~3 significant digits), and the adapter
    gradient points the same way (cosine > 0.95; measured 0.97), closer than with bf16 experts (0.76-0.90
    measured), which is why float32 is the default adapter_dtype."""

    def run(dtype: torch.dtype, adapter_dtype: str = "float32") -> tuple[ComoeModel, dict, torch.Tensor]:
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_config()).to(dtype)
        config = ComoeConfig.preset("moelora", r=4, lora_dropout=0.0, adapter_dtype=adapter_dtype)
        comoe = get_comoe_model(model, config)
        with torch.no_grad():
            for layer in comoe.comoe_layers().values():
                layer.lora_B.normal_(0, 0.1)
        comoe.train()
        loss = comoe(**batch_for("llama")).loss
        loss.backward()
        grad = torch.cat([p.grad.float().flatten() for p in comoe.parameters() if p.requires_grad])
        return comoe, {"loss": float(loss.detach()), **comoe.last_aux_losses()}, grad

    bf16, low, grad_bf16 = run(torch.bfloat16)
    _, full, grad_fp32 = run(torch.float32)
    _, _, grad_bf16_experts = run(torch.bfloat16, "base")
    layer = next(iter(bf16.comoe_layers().values()))
    assert layer.lora_A.dtype == layer.router.weight.dtype == torch.float32
    assert layer.base_layer.weight.dtype == torch.bfloat16
    for name in ("loss", "task", "balance", "contrastive"):
        assert low[name] == pytest.approx(full[name], rel=2e-2), name
    cosine = nn.functional.cosine_similarity(grad_bf16, grad_fp32, dim=0)
    assert cosine > 0.95
    assert cosine > nn.functional.cosine_similarity(grad_bf16_experts, grad_fp32, dim=0)
