"""comoe.adapter.lora: the PEFT LoRA and DoRA baselines at comoe's capacity, their ranks computed by hand."""

import pytest
import torch
from peft import get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from comoe import ComoeConfig, get_comoe_model
from comoe.adapter.lora import comoe_trainable_parameters, matched_lora_config
from tests.helpers import tiny_llama

# The tiny LLaMA's attention projections (hidden 64, 4 heads, 2 key/value heads): (d_in, d_out).
SHAPES = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64)}


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(("n", "r", "d_in", "d_out"), [(4, 16, 64, 32), (8, 2, 10, 7), (1, 1, 3, 5)])
def test_comoe_parameters_of_one_layer_are_experts_plus_router(n, r, d_in, d_out):
    config = ComoeConfig(num_experts=n, top_k=1, r=r)
    assert comoe_trainable_parameters(config, d_in, d_out) == n * r * (d_in + d_out) + n * d_in
    layer = get_comoe_model(
        torch.nn.Sequential(torch.nn.Linear(d_in, d_out)),
        ComoeConfig(num_experts=n, top_k=1, r=r, target_modules=["0"]),
    )
    assert trainable(layer) == comoe_trainable_parameters(config, d_in, d_out)


@pytest.mark.parametrize(
    ("fields", "router"),
    [
        (dict(routing="threshold"), lambda n, d_in: n * d_in + d_in + 1),  # AdaMoLE's threshold network
        (dict(routing="prompt"), lambda n, d_in: n * d_in),
        (dict(routing="task", tasks=["a", "b", "c"], task_embedding_dim=6), lambda n, d_in: 3 * 6 + n * 6),
    ],
    ids=["threshold", "prompt", "task"],
)
def test_the_routing_kinds_own_router_parameters_are_counted(fields, router):
    config = ComoeConfig(num_experts=5, top_k=5, r=3, target_modules=["0"], **fields)
    assert comoe_trainable_parameters(config, 10, 7) == 5 * 3 * (10 + 7) + router(5, 10)
    model = get_comoe_model(torch.nn.Sequential(torch.nn.Linear(10, 7)), config)
    assert trainable(model) == comoe_trainable_parameters(config, 10, 7)


@pytest.mark.parametrize(
    ("n", "r", "targets"),
    [(4, 4, ["q_proj", "k_proj", "v_proj", "o_proj"]), (8, 2, ["q_proj", "v_proj"]), (2, 1, ["k_proj"])],
)
def test_the_rank_is_the_nearest_integer_to_comoe_parameters_per_rank(n, r, targets):
    config = ComoeConfig(
        num_experts=n, top_k=1, r=r, lora_alpha=3.0 * r, lora_dropout=0.1, target_modules=targets
    )
    blocks = 2
    total = blocks * sum(n * r * (SHAPES[t][0] + SHAPES[t][1]) + n * SHAPES[t][0] for t in targets)
    per_rank = blocks * sum(SHAPES[t][0] + SHAPES[t][1] for t in targets)
    lora = matched_lora_config(config, tiny_llama())
    assert lora.r == max(1, round(total / per_rank))
    assert lora.lora_alpha == pytest.approx(3.0 * lora.r)  # the same scaling alpha / r as comoe's
    assert (lora.lora_dropout, set(lora.target_modules), lora.task_type) == (0.1, set(targets), "CAUSAL_LM")
    peft = get_peft_model(tiny_llama(), lora)
    assert trainable(peft) == lora.r * per_rank
    assert abs(trainable(peft) - total) <= per_rank / 2  # equal up to the rounding of the rank


def test_layers_to_transform_and_modules_to_save_pass_through():
    config = ComoeConfig(r=4, target_modules=["q_proj"], layers_to_transform=[1], modules_to_save=["lm_head"])
    lora = matched_lora_config(config, tiny_llama())
    assert (lora.layers_to_transform, lora.modules_to_save) == ([1], ["lm_head"])
    # one layer counted: 4 * 4 * 128 + 4 * 64 over 128 per rank
    assert lora.r == round((4 * 4 * 128 + 4 * 64) / 128)
    peft = get_peft_model(tiny_llama(), lora)
    adapted = {name.split(".lora_A")[0] for name, _ in peft.named_parameters() if "lora_A" in name}
    assert adapted == {"base_model.model.model.layers.1.self_attn.q_proj"}


def test_a_regex_target_is_matched_as_comoe_matches_it():
    config = ComoeConfig(num_experts=4, top_k=2, r=4, target_modules=r".*layers\.0\.self_attn\.(q|v)_proj")
    lora = matched_lora_config(config, tiny_llama())
    total = sum(4 * 4 * (SHAPES[t][0] + SHAPES[t][1]) + 4 * 64 for t in ("q_proj", "v_proj"))
    assert lora.r == round(total / (128 + 96)) and lora.target_modules == config.target_modules


def test_on_gpt2_the_default_targets_become_its_fused_attention_projection():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32))
    lora = matched_lora_config(ComoeConfig(r=8), gpt2)
    assert list(lora.target_modules) == ["c_attn"]
    # Conv1D c_attn: 32 -> 96 in each of 2 blocks
    assert lora.r == round((4 * 8 * (32 + 96) + 4 * 32) / (32 + 96))


@pytest.mark.parametrize(
    ("n", "r", "targets", "bank"),
    [
        (4, 4, ["q_proj", "k_proj", "v_proj", "o_proj"], "lora"),
        (8, 2, ["q_proj", "v_proj"], "lora"),
        (4, 16, ["q_proj", "k_proj", "v_proj", "o_proj"], "lora"),
        (4, 4, ["q_proj", "v_proj"], "hydra"),
    ],
)
def test_the_dora_rank_counts_its_magnitude_vectors(n, r, targets, bank):
    """DoRA trains a magnitude vector of d_out entries per adapted linear beside A and B: the matched rank
    leaves room for them, and PEFT's DoRA model has comoe's count up to the rank's rounding."""
    config = ComoeConfig(num_experts=n, top_k=2, r=r, target_modules=targets, expert_bank=bank)
    blocks = 2
    total = blocks * sum(comoe_trainable_parameters(config, *SHAPES[t]) for t in targets)
    per_rank = blocks * sum(SHAPES[t][0] + SHAPES[t][1] for t in targets)
    magnitudes = blocks * sum(SHAPES[t][1] for t in targets)
    dora = matched_lora_config(config, tiny_llama(), use_dora=True)
    assert dora.use_dora and not matched_lora_config(config, tiny_llama()).use_dora
    assert dora.r == max(1, round((total - magnitudes) / per_rank))
    peft = get_peft_model(tiny_llama(), dora)
    assert trainable(peft) == dora.r * per_rank + magnitudes  # A, B and one magnitude per output feature
    assert abs(trainable(peft) - total) <= per_rank / 2  # equal up to the rounding of the rank
    assert sum("lora_magnitude_vector" in name for name, _ in peft.named_parameters()) == blocks * len(targets)


def test_the_dora_rank_on_gpt2_counts_the_fused_projections_outputs():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32))
    dora = matched_lora_config(ComoeConfig(r=8), gpt2, use_dora=True)
    assert dora.r == round(((4 * 8 * (32 + 96) + 4 * 32) - 96) / (32 + 96))  # Conv1D c_attn: 32 -> 96
