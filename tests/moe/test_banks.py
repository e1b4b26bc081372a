"""Expert banks: LoRA experts against a per-expert loop, HydraLoRA (one shared A, n B heads) against the
plain sum over heads in values and gradients, the hydralora preset counted, matched and saved; and the
seam itself: a toy bank (one shared B, n A's) registered from this test alone -- built, trained, counted,
saved and loaded without editing any other module. OMoE's orthogonal bank: its QR path against a plain
Gram-Schmidt loop in values and gradients, different experts' outputs orthogonal, its preset saved and
loaded. DoRA experts: their norms against the materialised weights, the layer against plain per-expert DoRA
(values and gradients), the contrastive objectives on their materialised outputs against the reference, the
comoe-dora preset counted, trained, saved and loaded."""

import json
import math

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from comoe import ComoeConfig, ComoeModel, get_comoe_model
from comoe.adapter.injection import adapter_shapes
from comoe.adapter.layer import ComoeContext, ComoeLinear
from comoe.adapter.lora import comoe_trainable_parameters, matched_lora_config
from comoe.adapter.targeting import find_target_linears
from comoe.moe.banks import (
    BANKS,
    DoraExperts,
    ExpertBank,
    HydraExperts,
    LoraExperts,
    OrthogonalExperts,
    dora_weight_norms,
    get_bank,
    gram_schmidt_rows,
    register_bank,
    squared_row_norms,
    unregister_bank,
)
from comoe.objectives.reference import comoe_loss, moelora_loss
from comoe.objectives.registry import get_objective
from tests.helpers import tiny_llama


class SharedUpProjection(ExpertBank):
    """A toy bank, the mirror of HydraLoRA: n down-projections A [n, r, d_in], one B [1, r, d_out] that
    every expert shares (read as an [n, r, d_out] view)."""

    name = "shared_b_toy"

    @classmethod
    def shapes(cls, num_experts, r, in_features, out_features):
        return {"lora_A": (num_experts, r, in_features), "lora_B": (1, r, out_features)}

    @classmethod
    def reset_parameters(cls, layer):
        with torch.no_grad():
            for expert in layer.lora_A:
                nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
            layer.lora_B.zero_()

    @classmethod
    def down_project(cls, layer, x):
        n, r, d_in = layer.lora_A.shape
        return (x @ layer.lora_A.reshape(n * r, d_in).t()).view(-1, n, r)

    @classmethod
    def up_weight(cls, layer):
        return layer.lora_B.expand(layer.num_experts, -1, -1)


@pytest.fixture
def toy_bank():
    register_bank(SharedUpProjection)
    yield SharedUpProjection
    unregister_bank("shared_b_toy")


def test_lora_experts_down_project_as_a_loop_over_experts():
    layer = nn.Module()
    layer.in_features, layer.out_features = 12, 7
    LoraExperts.create(layer, 3, 4, dict(dtype=torch.float64))
    x = torch.randn(5, 12, dtype=torch.float64)
    z = LoraExperts.down_project(layer, x)
    for i in range(3):
        torch.testing.assert_close(z[:, i], x @ layer.lora_A[i].t())
    assert torch.equal(LoraExperts.up_weight(layer), torch.zeros(3, 4, 7, dtype=torch.float64))
    assert LoraExperts.num_parameters(3, 4, 12, 7) == 3 * 4 * (12 + 7)


def test_hydra_bank_is_one_shared_down_projection_and_n_heads():
    layer = nn.Module()
    layer.in_features, layer.out_features = 12, 7
    HydraExperts.create(layer, 3, 4, dict(dtype=torch.float64))
    assert (layer.lora_A.shape, layer.lora_B.shape) == ((4, 12), (3, 4, 7))
    assert HydraExperts.num_parameters(3, 4, 12, 7) == 4 * 12 + 3 * 4 * 7
    x = torch.randn(5, 12, dtype=torch.float64)
    z = HydraExperts.down_project(layer, x)
    assert z.shape == (5, 3, 4) and z.stride(1) == 0  # one A x, seen by every head without a copy
    for i in range(3):
        torch.testing.assert_close(z[:, i], x @ layer.lora_A.t())
    assert torch.equal(HydraExperts.up_weight(layer), torch.zeros(3, 4, 7, dtype=torch.float64))
    assert get_bank("hydra") is HydraExperts


def bank_layer(
    bank: str, out_features: int, nonzero: str, routing: str, strategy: str, **fields
) -> ComoeLinear:
    """A float64 layer 12 -> `out_features` of 4 experts of rank 3 in expert bank `bank`, with the parameter
    `nonzero` drawn from N(0, 0.5) (the one its bank starts at zero) and a non-uniform router."""
    torch.manual_seed(0)
    config = ComoeConfig(
        num_experts=4,
        top_k=2,
        r=3,
        lora_alpha=6.0,
        lora_dropout=0.0,
        routing=routing,
        expert_bank=bank,
        expert_compute=strategy,
        adapter_dtype="base",
        **fields,
    )
    layer = ComoeLinear(nn.Linear(12, out_features).double(), config, ComoeContext())
    with torch.no_grad():
        getattr(layer, nonzero).normal_(0, 0.5)
        layer.router.weight.normal_(0, 1.0)
    return layer


def hydra_layer(routing: str, strategy: str, **fields) -> ComoeLinear:
    """A HydraLoRA layer 12 -> 10 (4 heads of rank 3) with non-zero heads."""
    return bank_layer("hydra", 10, "lora_B", routing, strategy, **fields)


def hydra_reference(layer: ComoeLinear, x: torch.Tensor) -> torch.Tensor:
    """The paper's forward written out: W0 x + sum_i g_i (alpha/r) B_i (A x), a loop over the heads, with
    g the router's softmax (soft) or its top-k renormalised (zero for the other heads). The softmax is in
    float32, as the layer takes it whatever the adapter's dtype."""
    probs = torch.softmax((x @ layer.router.weight.t()).float(), dim=-1).to(x.dtype)
    if layer.routing_kind.dense:
        gates = probs
    else:
        top, index = probs.topk(layer.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(1, index, top / top.sum(-1, keepdim=True))
    shared = x @ layer.lora_A.t()  # A x, once for every head
    out = layer.base_layer(x)
    for i in range(layer.num_experts):
        out = out + gates[:, i : i + 1] * layer.scaling * (shared @ layer.lora_B[i])
    return out


@pytest.mark.parametrize("strategy", ["blocks", "grouped"])
@pytest.mark.parametrize("routing", ["soft", "topk"])
def test_a_hydra_layer_is_the_plain_sum_over_heads_in_values_and_gradients(routing, strategy):
    layer = hydra_layer(routing, strategy)
    x = torch.randn(16, 12, dtype=torch.float64, requires_grad=True)
    out, expected = layer(x), hydra_reference(layer, x)
    # float64 throughout except the router's float32 softmax and gates: equal to float32 rounding
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    weights = torch.randn_like(out)
    params = [x, layer.router.weight, layer.lora_A, layer.lora_B]
    got = torch.autograd.grad((out * weights).sum(), params)
    want = torch.autograd.grad((expected * weights).sum(), params)
    for name, a, b in zip(["x", "router", "A", "B"], got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert got[2].abs().sum() > 0 and got[1].abs().sum() > 0  # the shared A and the router learn


def test_the_comoe_objective_on_hydra_experts_is_the_reference_on_their_outputs():
    """CoMoE's Gram path reads hydra's z and B like any bank's: equal to the reference on materialised
    outputs s * B_i (A x), in value and in the gradients of A and B (plain cosines, norm floor 0; the fast
    path's Gram matrix is float32)."""
    config = dict(contrastive="comoe", contrastive_norm_floor=0.0)
    layer = hydra_layer("topk", "blocks", **config)
    config = ComoeConfig(num_experts=4, top_k=2, r=3, expert_bank="hydra", **config)
    layer.context.keep_records = True
    x = torch.randn(16, 12, dtype=torch.float64)
    layer(x)
    record = layer.record
    fast = get_objective("comoe").loss(record, config)
    outputs = layer.scaling * torch.einsum("tr,nro->tno", x @ layer.lora_A.t(), layer.lora_B)
    reference = comoe_loss(outputs, record.routing.indices, config.temperature, anchor="all")
    torch.testing.assert_close(fast.double(), reference, rtol=1e-5, atol=1e-6)
    assert fast > 0
    got = torch.autograd.grad(fast, [layer.lora_A, layer.lora_B])
    want = torch.autograd.grad(reference, [layer.lora_A, layer.lora_B])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_hydralora_preset_is_counted_matched_and_saved(tmp_path):
    config = ComoeConfig.preset("hydralora")
    assert (config.routing, config.expert_bank, config.num_experts, config.r) == ("soft", "hydra", 4, 4)
    base = tiny_llama()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_at_init = base(ids).logits
    model = get_comoe_model(base, config).eval()
    layers = model.comoe_layers()
    assert sorted({name.rsplit(".", 1)[1] for name in layers}) == ["down_proj", "gate_proj", "up_proj"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected_at_init)  # heads at zero: the base exactly
    # counted from the bank's shapes: gate/up 64 -> 96, down 96 -> 64, in both blocks
    targets = find_target_linears(tiny_llama(), config)
    per_layer = {
        name.rsplit(".", 1)[1]: comoe_trainable_parameters(config, m.in_features, m.out_features)
        for name, m in targets.items()
    }
    assert per_layer["gate_proj"] == 4 * 64 + 4 * 4 * 96 + 4 * 64  # shared A, 4 heads, router
    assert per_layer["down_proj"] == 4 * 96 + 4 * 4 * 64 + 4 * 96
    total = sum(comoe_trainable_parameters(config, m.in_features, m.out_features) for m in targets.values())
    assert model.get_nb_trainable_parameters()[0] == total
    assert adapter_shapes(targets, config) == {
        k: tuple(v.shape) for k, v in model.adapter_state_dict().items()
    }
    # the matched LoRA baseline: the same modules at the same count, up to the rank's rounding
    lora = matched_lora_config(config, tiny_llama())
    per_rank = 2 * ((64 + 96) * 2 + (96 + 64))
    assert lora.r == round(total / per_rank) and set(lora.target_modules) == set(config.target_modules)
    peft = get_peft_model(tiny_llama(), lora)
    assert abs(sum(p.numel() for p in peft.parameters() if p.requires_grad) - total) <= per_rank / 2
    # dense routing over the heads; saved and loaded
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_(0, 0.1)
        with model.record_routing() as records:
            trained = model(ids).logits
    record = next(iter(records.values()))
    assert record.routing.indices.shape[1] == 4 and torch.equal(record.routing.gates, record.routing.probs)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["expert_bank"], saved["routing"], saved["r"]) == ("hydra", "soft", 4)
    loaded = ComoeModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained)


def plain_gram_schmidt(vectors: torch.Tensor) -> torch.Tensor:
    """The textbook process, one row at a time: subtract the projections on the rows already made, then
    normalise."""
    rows = []
    for v in vectors:
        for u in rows:
            v = v - (v @ u) * u
        rows.append(v / v.norm())
    return torch.stack(rows)


@pytest.mark.parametrize("shape", [(6, 10), (12, 12), (1, 5)])
def test_gram_schmidt_rows_is_the_plain_loop_in_values_and_gradients(shape):
    torch.manual_seed(0)
    vectors = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    fast, plain = gram_schmidt_rows(vectors), plain_gram_schmidt(vectors)
    torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast @ fast.t(), torch.eye(shape[0], dtype=torch.float64))
    weights = torch.randn_like(fast)
    got = torch.autograd.grad((fast * weights).sum(), vectors)[0]
    want = torch.autograd.grad((plain * weights).sum(), vectors)[0]
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    assert gram_schmidt_rows(vectors.detach().bfloat16()).dtype == torch.bfloat16  # QR in float32


def omoe_layer(routing: str, strategy: str) -> ComoeLinear:
    """An OMoE layer 12 -> 16 (4 experts of rank 3: 12 orthonormal rows in 16 dimensions) with non-zero A."""
    return bank_layer("omoe", 16, "lora_A", routing, strategy)


@pytest.mark.parametrize("strategy", ["blocks", "grouped"])
@pytest.mark.parametrize("routing", ["soft", "topk"])
def test_an_omoe_layer_is_the_routed_sum_over_gram_schmidt_experts_in_values_and_gradients(routing, strategy):
    """The layer against W0 x + sum_i g_i s B_i^T A_i x with B the plain Gram-Schmidt loop's rows of V."""
    layer = omoe_layer(routing, strategy)
    assert get_bank("omoe") is OrthogonalExperts and not hasattr(layer, "lora_B")
    x = torch.randn(16, 12, dtype=torch.float64, requires_grad=True)
    probs = torch.softmax((x @ layer.router.weight.t()).float(), dim=-1).to(x.dtype)
    if layer.routing_kind.dense:
        gates = probs
    else:
        top, index = probs.topk(2, dim=-1)
        gates = torch.zeros_like(probs).scatter(1, index, top / top.sum(-1, keepdim=True))
    B = plain_gram_schmidt(layer.lora_V.reshape(12, 16)).view(4, 3, 16)
    expected = layer.base_layer(x)
    for i in range(4):
        expected = expected + gates[:, i : i + 1] * layer.scaling * (x @ layer.lora_A[i].t() @ B[i])
    out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    weights = torch.randn_like(out)
    params = [x, layer.router.weight, layer.lora_A, layer.lora_V]
    got = torch.autograd.grad((out * weights).sum(), params)
    want = torch.autograd.grad((expected * weights).sum(), params)
    for name, a, b in zip(["x", "router", "A", "V"], got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert got[3].abs().sum() > 0  # V learns through the orthonormalisation


def test_different_omoe_experts_give_orthogonal_outputs_and_start_at_zero():
    layer = omoe_layer("soft", "blocks")
    x = torch.randn(16, 12, dtype=torch.float64)
    z = layer.bank.down_project(layer, x)  # [T, n, r]
    outputs = torch.einsum("tnr,nro->tno", z, layer.bank.up_weight(layer))  # every expert, every token
    between = torch.einsum("tio,tjo->tij", outputs, outputs)
    off_diagonal = between[:, ~torch.eye(4, dtype=torch.bool)]
    assert off_diagonal.abs().max() < 1e-10 * between.abs().max()
    assert outputs.norm(dim=-1).min() > 0
    # a freshly built layer: A = 0, so the experts' outputs are zero and the layer is its base
    fresh = ComoeLinear(
        nn.Linear(12, 16), ComoeConfig(num_experts=4, r=3, expert_bank="omoe"), ComoeContext()
    )
    assert torch.equal(fresh.lora_A, torch.zeros(4, 3, 12)) and fresh.lora_V.abs().sum() > 0
    inputs = torch.randn(5, 12)
    torch.testing.assert_close(fresh(inputs), fresh.base_layer(inputs))
    with pytest.raises(ValueError, match=r"num_experts \* r = 4 \* 5 = 20 .* <= 16"):
        OrthogonalExperts.shapes(4, 5, 12, 16)


def test_the_omoe_preset_is_counted_and_saved(tmp_path):
    config = ComoeConfig.preset("omoe", r=8)  # the tiny model's k/v projections have 32 outputs: 4 * 8
    assert (config.routing, config.expert_bank, config.num_experts, config.lora_alpha) == (
        "soft",
        "omoe",
        4,
        32,
    )
    assert ComoeConfig.preset("omoe").r == 16
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    model = get_comoe_model(tiny_llama(), config).eval()
    targets = find_target_linears(tiny_llama(), config)
    total = sum(comoe_trainable_parameters(config, m.in_features, m.out_features) for m in targets.values())
    assert total == sum(
        4 * 8 * (m.in_features + m.out_features) + 4 * m.in_features for m in targets.values()
    )
    assert model.get_nb_trainable_parameters()[0] == total
    assert adapter_shapes(targets, config) == {
        k: tuple(v.shape) for k, v in model.adapter_state_dict().items()
    }
    with torch.no_grad():
        for layer in model.comoe_layers().values():
            layer.lora_A.normal_(0, 0.1)
        trained = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["expert_bank"], saved["routing"], saved["r"]) == ("omoe", "soft", 8)
    loaded = ComoeModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained)


def test_a_registered_bank_is_built_trained_counted_saved_and_loaded(toy_bank, tmp_path):
    config = ComoeConfig.preset("comoe", r=4, lora_dropout=0.0, expert_bank="shared_b_toy")
    base = tiny_llama()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_at_init = base(ids).logits
    model = get_comoe_model(base, config)
    layer = next(iter(model.comoe_layers().values()))
    assert layer.lora_A.shape == (4, 4, layer.in_features) and layer.lora_B.shape == (
        1,
        4,
        layer.out_features,
    )
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected_at_init)  # B = 0: the base model exactly
    # counted: the bank's shapes plus the routers, for every adapted linear
    targets = find_target_linears(tiny_llama(), config)
    per_layer = [comoe_trainable_parameters(config, m.in_features, m.out_features) for m in targets.values()]
    assert model.get_nb_trainable_parameters()[0] == sum(per_layer)
    assert per_layer[0] == 4 * 4 * 64 + 4 * 64 + 4 * 64  # 4 A's, one shared B (q: 64 -> 64), router
    assert adapter_shapes(targets, config) == {
        k: tuple(v.shape) for k, v in model.adapter_state_dict().items()
    }
    # trained: the A's and the shared B move, through the contrastive objective too
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert model.last_aux_losses()["contrastive"] > 0
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
    assert not torch.allclose(trained, expected_at_init)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["expert_bank"] == "shared_b_toy"
    loaded = ComoeModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained)


def test_unknown_banks_are_refused_and_the_default_is_not_written(tmp_path):
    assert "lora" in BANKS and get_bank("lora") is LoraExperts
    with pytest.raises(
        ValueError, match="expert_bank='tied' is not a registered expert bank; valid: lora, hydra"
    ):
        get_comoe_model(tiny_llama(), ComoeConfig.preset("moe", expert_bank="tied"))
    with pytest.raises(ValueError, match="expert_bank='a b'"):
        ComoeConfig(expert_bank="a b")
    get_comoe_model(tiny_llama(), ComoeConfig.preset("moe")).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "expert_bank" not in saved and "aux_objectives" not in saved  # the folder format as before


def test_dora_weight_norms_are_the_row_norms_of_the_materialised_weights():
    """The expanded form against ||W0 + s B_i A_i|| of each output row, the weights materialised per expert;
    at B = 0 exactly what reset_parameters sets m to; in float32 for a bfloat16 base."""
    torch.manual_seed(0)
    weight = torch.randn(10, 12, dtype=torch.float64)
    lora_A, lora_B = torch.randn(3, 4, 12, dtype=torch.float64), torch.randn(3, 4, 10, dtype=torch.float64)
    fast = dora_weight_norms(weight, lora_A, lora_B, 1.5)
    plain = torch.stack([torch.linalg.norm(weight + 1.5 * lora_B[i].t() @ lora_A[i], dim=1) for i in range(3)])
    torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)
    at_zero = dora_weight_norms(weight, lora_A, torch.zeros_like(lora_B), 1.5)
    assert torch.equal(at_zero, squared_row_norms(weight).sqrt().expand(3, -1))
    half = dora_weight_norms(weight.bfloat16(), lora_A.float(), lora_B.float(), 1.5)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), plain, rtol=2e-2, atol=0.0)  # bfloat16 W0's rounding


def dora_layer(routing: str, strategy: str, conv1d: bool = False, **fields) -> ComoeLinear:
    """A DoRA-expert layer 12 -> 10 (4 experts of rank 3; nn.Linear or GPT-2's Conv1D base) with non-zero
    B and magnitudes moved off their initial norms."""
    if not conv1d:
        layer = bank_layer("dora", 10, "lora_B", routing, strategy, **fields)
    else:
        torch.manual_seed(0)
        base = Conv1D(10, 12).double()
        with torch.no_grad():
            base.weight.normal_(0, 0.3)
            base.bias.normal_(0, 0.3)
        config = ComoeConfig(
            num_experts=4, top_k=2, r=3, lora_alpha=6.0, lora_dropout=0.0, routing=routing,
            expert_bank="dora", expert_compute=strategy, adapter_dtype="base", **fields,
        )
        layer = ComoeLinear(base, config, ComoeContext())
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.5)
            layer.router.weight.normal_(0, 1.0)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1 + 0.3 * torch.randn_like(layer.lora_magnitude_vector))
    return layer


def dora_expert_outputs(layer: ComoeLinear, x: torch.Tensor) -> torch.Tensor:
    """DoRA written out per expert (arXiv 2402.09353, eq. 5): W_i' = m_i (W0 + s B_i A_i) / ||W0 + s B_i
    A_i||_c with each adapted weight materialised and its row norms detached (section 4.3, as PEFT), and
    E_i(x) = W_i' x - W0 x; [T, n, d_out]."""
    base = layer.base_layer
    weight = base.weight.t() if isinstance(base, Conv1D) else base.weight  # Conv1D stores [d_in, d_out]
    outputs = []
    for i in range(layer.num_experts):
        adapted = weight + layer.scaling * layer.lora_B[i].t() @ layer.lora_A[i]  # [d_out, d_in]
        norms = torch.linalg.norm(adapted, dim=1).detach()
        directed = layer.lora_magnitude_vector[i].unsqueeze(1) * adapted / norms.unsqueeze(1)
        outputs.append(x @ directed.t() - x @ weight.t())
    return torch.stack(outputs, dim=1)


def plain_gates(layer: ComoeLinear, x: torch.Tensor, routing: str) -> torch.Tensor:
    """[T, n] the router's softmax (soft) or its top-k renormalised, zero elsewhere; softmax in float32."""
    probs = torch.softmax((x @ layer.router.weight.t()).float(), dim=-1).to(x.dtype)
    if routing == "soft":
        return probs
    top, index = probs.topk(layer.top_k, dim=-1)
    return torch.zeros_like(probs).scatter(1, index, top / top.sum(-1, keepdim=True))


@pytest.mark.parametrize("materialise", [False, True], ids=["mixed", "materialised"])
@pytest.mark.parametrize(
    ("routing", "strategy", "conv1d"),
    [("topk", "blocks", False), ("topk", "grouped", False), ("soft", "blocks", False), ("topk", "blocks", True)],
    ids=["topk-blocks", "topk-grouped", "soft", "conv1d"],
)
def test_a_dora_layer_is_the_routed_sum_of_plain_dora_experts_in_values_and_gradients(
    routing, strategy, conv1d, materialise
):
    """W0 x + b + sum_i g_i E_i(x) against every expert's adapted weight materialised: values and gradients
    for x, the router, A, B and the magnitudes; the mixed path (no record) and the materialised one."""
    layer = dora_layer(routing, strategy, conv1d)
    layer.eval()  # no dropout here; the record's outputs are kept when the layer is asked for records
    layer.context.keep_records = materialise
    x = torch.randn(16, 12, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    outputs = dora_expert_outputs(layer, x)
    expected = layer.base_layer(x) + (plain_gates(layer, x, routing).unsqueeze(-1) * outputs).sum(1)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    if materialise:
        torch.testing.assert_close(layer.record.outputs, outputs, rtol=1e-10, atol=1e-10)
        assert layer.record.gram is None
    else:
        assert layer.record is None
    weights = torch.randn_like(out)
    params = [x, layer.router.weight, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector]
    got = torch.autograd.grad((out * weights).sum(), params)
    want = torch.autograd.grad((expected * weights).sum(), params)
    for name, a, b in zip(["x", "router", "A", "B", "m"], got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        assert b.abs().sum() > 0, name


def test_under_dropout_a_dora_expert_sees_the_dropped_out_input_w0_x_included():
    """As PEFT's DoRA in training: E_i(dropout(x)), its W0 term recomputed on the dropped-out input, while
    the base layer and the router see x (the same draw: the dropout is the layer's only random op)."""
    layer = dora_layer("topk", "blocks")
    layer.lora_dropout = nn.Dropout(0.3)
    layer.train()
    x = torch.randn(16, 12, dtype=torch.float64)
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    dropped = nn.functional.dropout(x, 0.3, training=True)
    outputs = dora_expert_outputs(layer, dropped)
    expected = layer.base_layer(x) + (plain_gates(layer, x, "topk").unsqueeze(-1) * outputs).sum(1)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("adapter_dtype", ["float32", "bfloat16"])
def test_a_fresh_dora_layer_is_its_base_exactly_with_m_the_weights_row_norms(adapter_dtype):
    torch.manual_seed(0)
    config = ComoeConfig.preset("comoe-dora", r=3, adapter_dtype=adapter_dtype)
    layer = ComoeLinear(nn.Linear(12, 10), config, ComoeContext())
    assert layer.lora_magnitude_vector.shape == (4, 10) and get_bank("dora") is DoraExperts
    norms = torch.linalg.norm(layer.base_layer.weight, dim=1).to(layer.lora_magnitude_vector.dtype)
    torch.testing.assert_close(layer.lora_magnitude_vector, norms.expand(4, -1))
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B)) and layer.lora_A.abs().sum() > 0
    x = torch.randn(2, 7, 12)
    assert torch.equal(layer(x), layer.base_layer(x))  # m / ||W0||_c = 1 and B = 0: bit for bit
    assert DoraExperts.num_parameters(4, 3, 12, 10) == 4 * 3 * (12 + 10) + 4 * 10


@pytest.mark.parametrize("objective", ["comoe", "moelora"])
@pytest.mark.parametrize("norm_floor", [0.0, 0.3])
def test_contrastive_objectives_on_dora_experts_are_the_reference_on_their_outputs(objective, norm_floor):
    """DoRA experts' outputs are not s B_i^T z_i, so the record carries them materialised and the objectives
    take plain cosines: equal to reference.comoe_loss / moelora_loss on the per-expert outputs, in value and
    in the gradients of A, B, the magnitudes and x; the norm floor in output space (|W0 x + b| times it)."""
    fields = dict(contrastive=objective, contrastive_norm_floor=norm_floor, contrastive_max_tokens=64)
    layer = dora_layer("topk", "blocks", **fields)
    config = ComoeConfig(num_experts=4, top_k=2, r=3, expert_bank="dora", **fields)
    layer.train()  # a training forward materialises the outputs for the objective, and keeps no Gram
    layer.context.keep_records = True
    x = torch.randn(16, 12, dtype=torch.float64, requires_grad=True)
    layer(x)
    record = layer.record
    assert record.gram is None and record.outputs.shape == (16, 4, 10)
    outputs = dora_expert_outputs(layer, x)
    floor = None
    if norm_floor > 0:
        floor = norm_floor * layer.base_layer(x).detach().norm(dim=-1)
        torch.testing.assert_close(record.norm_floor.double(), floor)
    fast = get_objective(objective).loss(record, config)
    indices = record.routing.indices
    if objective == "comoe":
        reference = comoe_loss(outputs, indices, config.temperature, anchor="all", norm_floor=floor)
    else:
        reference = moelora_loss(outputs, indices, config.temperature, norm_floor=floor)
    torch.testing.assert_close(fast.double(), reference, rtol=1e-6, atol=1e-8)
    assert fast > 0
    params = [layer.lora_A, layer.lora_B, layer.lora_magnitude_vector, x]
    got = torch.autograd.grad(fast, params)
    want = torch.autograd.grad(reference, params)
    for name, a, b in zip(["A", "B", "m", "x"], got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8, msg=name)
        assert b.abs().sum() > 0, name


def test_the_comoe_dora_preset_is_counted_trained_saved_and_loaded(tmp_path):
    config = ComoeConfig.preset("comoe-dora", lora_dropout=0.0)
    assert (config.expert_bank, config.num_experts, config.top_k, config.r, config.lora_alpha) == (
        "dora",
        4,
        2,
        16,
        32,
    )
    assert (config.contrastive, config.contrastive_weight, config.routing) == ("comoe", 0.01, "topk")
    base = tiny_llama()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_at_init = base(ids).logits
    model = get_comoe_model(base, config)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected_at_init, rtol=0, atol=0)
    # counted: LoRA's A and B, the magnitude vectors (n * d_out) and the router, for every adapted linear
    targets = find_target_linears(tiny_llama(), config)
    total = sum(comoe_trainable_parameters(config, m.in_features, m.out_features) for m in targets.values())
    assert total == sum(
        4 * 16 * (m.in_features + m.out_features) + 4 * m.out_features + 4 * m.in_features
        for m in targets.values()
    )
    assert model.get_nb_trainable_parameters()[0] == total
    assert adapter_shapes(targets, config) == {
        k: tuple(v.shape) for k, v in model.adapter_state_dict().items()
    }
    layer = next(iter(model.comoe_layers().values()))
    initial = layer.lora_magnitude_vector.detach().clone()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert model.last_aux_losses()["contrastive"] > 0
    assert not torch.equal(layer.lora_magnitude_vector, initial)  # the magnitudes learn
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["expert_bank"], saved["contrastive"], saved["r"]) == ("dora", "comoe", 16)
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert sum(key.endswith("lora_magnitude_vector") for key in keys) == len(targets)
    loaded = ComoeModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained)
