"""comoe.moe.record: what a routed layer's forward leaves in its LayerRecord (routing, down-projections, the
experts' B, Gram matrix and norm floor), what the model attaches (the token mask), and that nothing stays."""

import torch

from comoe import ComoeConfig, get_comoe_model
from comoe.adapter import layer as layer_module
from comoe.adapter.layer import ComoeContext, ComoeLinear
from comoe.moe.experts import expert_gram
from comoe.moe.record import LayerRecord, token_columns
from comoe.moe.routing import route
from comoe.objectives.auxiliary import with_grams
from tests.helpers import make_layer, tiny_llama


def recorded(layer, x):
    layer.context.keep_records = True
    try:
        out = layer(x)
    finally:
        layer.context.keep_records = False
    return out, layer.record


def test_a_layer_records_its_routing_and_every_experts_down_projection():
    layer = make_layer(12, 10, n=5, k=2, r=3, strategy="blocks")
    x = torch.randn(2, 7, 12, generator=torch.Generator().manual_seed(0))
    _, record = recorded(layer, x)
    assert isinstance(record, LayerRecord) and record.mask is None  # the model attaches the mask
    flat = x.reshape(-1, 12)
    expected = route(flat @ layer.router.weight.t(), top_k=2)
    torch.testing.assert_close(record.routing.probs, expected.probs)
    assert torch.equal(record.routing.indices, expected.indices)
    assert record.z.shape == (14, 5, 3)
    for i in range(5):  # z[t, i] = A_i x_t
        torch.testing.assert_close(record.z[:, i], flat @ layer.lora_A[i].t())
    assert record.lora_B is layer.lora_B  # the parameter itself: gradients of the losses reach it


def test_without_keep_records_or_training_nothing_is_recorded():
    layer = make_layer(8, 8, n=4, k=2, r=2, strategy="blocks").eval()
    layer(torch.randn(3, 8))
    assert layer.record is None


def test_contrastive_objectives_make_the_layer_keep_the_gram_matrix_and_the_norm_floor(monkeypatch):
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6)
    config = ComoeConfig(
        num_experts=4,
        top_k=2,
        r=2,
        lora_alpha=4.0,
        lora_dropout=0.0,
        contrastive="comoe",
        contrastive_norm_floor=0.01,
    )
    layer = ComoeLinear(base, config, ComoeContext())
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 8)
    _, record = recorded(layer, x)
    assert record.gram is None  # one process: the auxiliary losses take every layer's Gram at once
    record = with_grams([record])[0]
    torch.testing.assert_close(record.gram, expert_gram(layer.lora_B))
    torch.testing.assert_close(record.gram, layer.lora_B.reshape(8, 6) @ layer.lora_B.reshape(8, 6).t())
    monkeypatch.setattr(layer_module, "gram_in_forward", lambda: True)  # several processes (FSDP)
    _, kept = recorded(layer, x)
    torch.testing.assert_close(kept.gram, record.gram)
    expected_floor = base(x).norm(dim=-1) * (0.01 / config.scaling)
    torch.testing.assert_close(record.norm_floor, expected_floor)

    plain = make_layer(8, 6, n=4, k=2, r=2, strategy="blocks")  # no objective: neither is computed
    _, record = recorded(plain, x)
    assert record.gram is None and record.norm_floor is None


def test_the_model_attaches_each_layers_token_mask_and_drops_the_records_after_the_forward():
    model = get_comoe_model(tiny_llama(), ComoeConfig(num_experts=4, top_k=2, r=2, lora_dropout=0.0)).eval()
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    with torch.no_grad(), model.record_routing() as records:
        model(input_ids=ids, attention_mask=mask)
    assert set(records) == set(model.comoe_layers()) and len(records) == 8
    for name, record in records.items():
        assert torch.equal(record.mask, mask.reshape(-1).bool()), name
        assert record.z.shape == (12, 4, 2) and record.routing.indices.shape == (12, 2)
        assert record.lora_B is model.comoe_layers()[name].lora_B
    assert all(layer.record is None for layer in model.comoe_layers().values())
    kept = {name: record.z for name, record in records.items()}
    with torch.no_grad():
        model(input_ids=ids[:1], attention_mask=mask[:1])  # outside record_routing: nothing is refreshed
    assert all(records[name].z is z for name, z in kept.items())
    assert all(layer.record is None for layer in model.comoe_layers().values())


def test_token_columns_are_the_masks_last_columns_or_none():
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(token_columns(mask, 8), mask)  # the whole call
    assert torch.equal(token_columns(mask, 2), mask[:, 3:])  # one decode step under a KV cache
    assert token_columns(mask, 3) is None and token_columns(mask, 10) is None  # not the mask's rows
