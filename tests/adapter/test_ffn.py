"""MixLoRA's FFN-block experts (comoe.adapter.ffn): the fast shared-FFN mixture against plain references that
loop over tokens and experts, the zero start, the balance loss, the parameter count and save/load."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.llama.modeling_llama import LlamaMLP

from comoe import ComoeConfig, ComoeModel, get_comoe_model
from comoe.adapter.ffn import ComoeFFN, LoraLinear
from comoe.adapter.layer import ComoeContext
from comoe.adapter.lora import matched_lora_config
from comoe.adapter.method import method_for
from comoe.adapter.serialization import WEIGHTS_NAME
from comoe.objectives.reference import load_balance_loss
from tests.helpers import tiny_config, tiny_llama

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def make_ffn(routing="topk", strategy="auto", n=4, k=2, r=3, bias=False, norm_topk_prob=None, seed=0):
    """A ComoeFFN over a small LlamaMLP with every B non-zero (so the experts differ)."""
    torch.manual_seed(seed)
    mlp = LlamaMLP(tiny_config(hidden_size=12, intermediate_size=20, mlp_bias=bias))
    config = ComoeConfig(
        num_experts=n,
        top_k=k,
        r=r,
        lora_alpha=2.0 * r,
        lora_dropout=0.0,
        routing=routing,
        expert_compute=strategy,
        norm_topk_prob=norm_topk_prob,
        ffn_experts=["mlp"],
    )
    layer = ComoeFFN(mlp, config, ComoeContext())
    with torch.no_grad():
        for projection in PROJECTIONS:
            getattr(layer, projection).lora_B.normal_(0.0, 0.3)
        layer.router.weight.normal_(0.0, 1.0)
    return layer


def materialised(layer: ComoeFFN, projection: str, expert: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W + s B_e^T A_e, bias) of one expert's projection, with comoe's storage (B kept [r, d_out])."""
    base = getattr(layer.base_layer, projection)
    experts = getattr(layer, projection)
    weight = base.weight + layer.scaling * experts.lora_B[expert].t() @ experts.lora_A[expert]
    return weight, base.bias


def apply(weight_bias: tuple[torch.Tensor, torch.Tensor | None], x: torch.Tensor) -> torch.Tensor:
    weight, bias = weight_bias
    return weight @ x + (0 if bias is None else bias)


def reference_ffn(layer: ComoeFFN, h: torch.Tensor) -> torch.Tensor:
    """sum_k g_k E_k(h_t), one token and one active expert at a time, each expert's weights materialised:
    E_k(h) = (W2 + s B2k A2k)[act((W1 + s B1k A1k) h) * ((W3 + s B3k A3k) h)] (arXiv 2404.15159)."""
    flat = h.reshape(-1, layer.in_features)
    probs = torch.softmax((flat @ layer.router.weight.t()).float(), dim=-1)  # comoe routes in float32
    rows = []
    for t in range(flat.shape[0]):
        if layer.routing_kind.dense:
            experts, gates = list(range(layer.num_experts)), probs[t]
        else:
            top, experts = probs[t].topk(layer.top_k)
            gates = top / top.sum() if layer.normalize_gates else top
            experts = experts.tolist()
        out = 0
        for slot, e in enumerate(experts):
            w1, w3, w2 = (materialised(layer, p, e) for p in PROJECTIONS)
            m = layer.base_layer.act_fn(apply(w1, flat[t])) * apply(w3, flat[t])
            out = out + gates[slot].to(m.dtype) * apply(w2, m)
        rows.append(out)
    return torch.stack(rows).view(*h.shape[:-1], layer.out_features)


def naive_ffn(layer: ComoeFFN, h: torch.Tensor) -> torch.Tensor:
    """MoE-PEFT's compatible forward: each expert runs the whole frozen FFN itself on its tokens (no W1 h,
    W3 h or W2 shared between experts), plus its LoRA terms, and its output is gated and added back."""
    flat = h.reshape(-1, layer.in_features)
    mlp = layer.base_layer
    probs = torch.softmax(flat @ layer.router.weight.t(), dim=-1)
    top, chosen = probs.topk(layer.top_k, dim=-1)
    gates = top / top.sum(-1, keepdim=True)
    out = torch.zeros(flat.shape[0], layer.out_features)

    def lora(projection: str, e: int, x: torch.Tensor) -> torch.Tensor:
        experts = getattr(layer, projection)
        return layer.scaling * (x @ experts.lora_A[e].t()) @ experts.lora_B[e]

    for e in range(layer.num_experts):
        tokens, slot = torch.where(chosen == e)
        x = flat[tokens]
        m = mlp.act_fn(mlp.gate_proj(x) + lora("gate_proj", e, x)) * (mlp.up_proj(x) + lora("up_proj", e, x))
        expert_out = mlp.down_proj(m) + lora("down_proj", e, m)
        out = out.index_add(0, tokens, expert_out * gates[tokens, slot, None])
    return out.view(*h.shape[:-1], layer.out_features)


def parameters(layer: ComoeFFN) -> dict[str, nn.Parameter]:
    return layer.adapter_parameters()  # router.weight and every projection's lora_A, lora_B


@pytest.mark.parametrize(
    ("routing", "strategy", "norm_topk_prob", "bias"),
    [
        ("topk", "blocks", None, False),
        ("topk", "grouped", None, False),
        ("soft", "blocks", None, False),
        ("topk", "blocks", False, True),  # Switch-style gates that do not sum to 1, and a down_proj bias
    ],
    ids=["topk-blocks", "topk-grouped", "soft", "unnormalised-bias"],
)
def test_mixture_equals_the_loop_over_tokens_and_experts_in_values_and_gradients(
    routing, strategy, norm_topk_prob, bias
):
    layer = make_ffn(routing, strategy, bias=bias, norm_topk_prob=norm_topk_prob).double()
    h = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 5, 12, dtype=torch.float64)
    fast = layer(h)
    grads = torch.autograd.grad((fast * weights).sum(), [h, *parameters(layer).values()])
    slow = reference_ffn(layer, h)
    slow_grads = torch.autograd.grad((slow * weights).sum(), [h, *parameters(layer).values()])
    # float64 everywhere but the router's softmax and gates, which comoe takes in float32 (their rounding,
    # ~1e-7, bounds the agreement; a wrong term would be off by O(1))
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-6)
    for name, got, want in zip(["h", *parameters(layer)], grads, slow_grads, strict=True):
        assert want.abs().sum() > 0, name  # every parameter takes part
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_shared_ffn_shortcut_equals_every_expert_running_the_whole_ffn():
    layer = make_ffn(n=6, k=2, seed=3)
    h = torch.randn(3, 4, 12)
    torch.testing.assert_close(layer(h), naive_ffn(layer, h), rtol=1e-5, atol=1e-6)


def test_the_mixture_starts_as_the_base_mlp_bit_for_bit():
    torch.manual_seed(0)
    mlp = LlamaMLP(tiny_config(hidden_size=12, intermediate_size=20))
    layer = ComoeFFN(mlp, ComoeConfig.preset("mixlora-ffn", r=4), ComoeContext())
    h = torch.randn(2, 6, 12)
    assert torch.equal(layer(h), mlp(h))
    assert float(layer.router.weight.std()) == pytest.approx(0.02, rel=0.3)  # MoE-PEFT's router_init_range


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_preset_starts_as_the_base_model_and_counts_its_parameters_by_hand(dtype):
    base = tiny_llama().to(dtype)
    ids = torch.randint(0, 128, (2, 7))
    expected = base(ids).logits
    model = get_comoe_model(base, ComoeConfig.preset("mixlora-ffn")).eval()
    assert torch.equal(model(input_ids=ids).logits, expected)  # bf16 base, float32 adapter: still exact
    # per block: plain LoRA r (d_in + d_out) on q (64->64), k and v (64->32), o (64->64) with r = 16;
    # 8 FFN experts: 8 r [(64 + 96) gate + (64 + 96) up + (96 + 64) down] + the router 8 x 64; 2 blocks
    attention = 16 * ((64 + 64) + 2 * (64 + 32) + (64 + 64))
    ffn = 8 * 16 * (3 * (64 + 96)) + 8 * 64
    assert model.get_nb_trainable_parameters()[0] == 2 * (attention + ffn) == 138240
    layers = model.comoe_layers()
    assert sorted(n for n, layer in layers.items() if isinstance(layer, ComoeFFN)) == [
        "model.layers.0.mlp",
        "model.layers.1.mlp",
    ]
    assert sum(isinstance(layer, LoraLinear) for layer in layers.values()) == 8
    assert list(method_for("mixlora-ffn").routed_layers(model)) == [
        "model.layers.0.mlp",
        "model.layers.1.mlp",
    ]


def test_plain_lora_linear_is_w0_x_plus_scaled_b_a_x():
    torch.manual_seed(0)
    base = nn.Linear(10, 6)
    layer = LoraLinear(base, ComoeConfig.preset("mixlora-ffn", r=2, lora_dropout=0.0), ComoeContext())
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 10)
    expected = base(x) + (32.0 / 2) * x @ (layer.lora_B[0].t() @ layer.lora_A[0]).t()
    torch.testing.assert_close(layer(x), expected)
    assert layer.router is None and "router.weight" not in dict(layer.named_parameters())


def test_balance_loss_is_the_reference_switch_loss_over_the_ffn_layers_only():
    model = get_comoe_model(tiny_llama(), ComoeConfig.preset("mixlora-ffn", lora_dropout=0.0)).train()
    ids = torch.randint(0, 128, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with model.record_routing() as records:
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert sorted(records) == ["model.layers.0.mlp", "model.layers.1.mlp"]  # plain LoRA layers record nothing
    expected = torch.stack(
        [load_balance_loss(r.routing.probs, r.routing.indices, r.mask) for r in records.values()]
    ).mean()
    assert model.last_aux_losses()["balance"] == pytest.approx(float(expected), rel=1e-6)
    task = model.last_aux_losses()["task"]
    assert float(out.loss) == pytest.approx(task + 0.001 * float(expected), rel=1e-6)


def test_save_and_load_round_trip_gives_identical_outputs(tmp_path):
    model = get_comoe_model(tiny_llama(), ComoeConfig.preset("mixlora-ffn"))
    with torch.no_grad():
        for name, param in model.adapter_state_dict().items():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    model.eval()
    ids = torch.randint(0, 128, (2, 7))
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert saved["model.layers.1.mlp.down_proj.lora_A"].shape == (8, 16, 96)
    assert "model.layers.0.self_attn.q_proj.router.weight" not in saved
    loaded = ComoeModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.comoe_config.ffn_experts == ["mlp"]
    assert torch.equal(loaded(input_ids=ids).logits, expected)
    assert torch.equal(loaded.unload()(ids).logits, tiny_llama()(ids).logits)


def test_a_gpt2_mlp_is_refused_naming_the_module_and_what_is_supported():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_positions=16, n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(
        ValueError, match=r"'transformer.h.0.mlp' is a GPT2MLP .*gate_proj, up_proj and down_proj"
    ):
        get_comoe_model(gpt2, ComoeConfig.preset("mixlora-ffn"))


def test_misconfigurations_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="contrastive"):
        ComoeConfig.preset("mixlora-ffn", contrastive="comoe")
    with pytest.raises(ValueError, match="ffn_experts"):
        ComoeConfig.preset("mixlora-ffn", ffn_experts=[])
    with pytest.raises(ValueError, match="ffn_experts=\\['ffn'\\] matches no module"):
        get_comoe_model(tiny_llama(), ComoeConfig.preset("mixlora-ffn", ffn_experts=["ffn"]))
    with pytest.raises(ValueError, match="ffn_experts=\\['mlp'\\]: the matched LoRA baseline"):
        matched_lora_config(ComoeConfig.preset("mixlora-ffn"), tiny_llama())
    with pytest.raises(ValueError, match="target_modules: .*inside the ffn_experts MLPs"):
        get_comoe_model(tiny_llama(), ComoeConfig.preset("mixlora-ffn", target_modules=["q_proj", "up_proj"]))
    # DoRA experts rescale the base weight: no LoRA update for an FFN block to add (once an AttributeError)
    with pytest.raises(ValueError, match="expert_bank='dora' with ffn_experts.*valid with ffn_experts: lora, hydra, omoe"):
        get_comoe_model(tiny_llama(), ComoeConfig.preset("mixlora-ffn", expert_bank="dora"))
