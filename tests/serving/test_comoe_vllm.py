"""comoe-vllm's adapter reader and mixture (serving/src/comoe_vllm, plain torch) against comoe's own layers:
for every preset whose inference is a routed LoRA mixture, the mixture the server adds to each linear
equals the ComoeLinear's expert output on the same input; what is not served is refused by name."""

import json

import pytest
import torch

from comoe.adapter.model import get_comoe_model
from comoe.config import PRESETS, ComoeConfig
from tests.helpers import tiny_llama

adapter_module = pytest.importorskip("comoe_vllm.adapter", reason="comoe-vllm is not installed (make setup)")
mixture_module = pytest.importorskip("comoe_vllm.mixture")
ComoeAdapter, Slice, PackedMixture = (
    adapter_module.ComoeAdapter,
    mixture_module.Slice,
    mixture_module.PackedMixture,
)

ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> the config; each a different inference path (bank, routing, gates, depth, targets)
SERVED = {
    "comoe": ComoeConfig.preset("comoe", target_modules=ALL_LINEARS),
    "moe-top1-switch-gate": ComoeConfig.preset("moe", top_k=1, norm_topk_prob=False, layers_to_transform=[1]),
    "soft": ComoeConfig.preset("moe", routing="soft", target_modules=["v_proj", "down_proj"]),
    "hydralora": ComoeConfig.preset("hydralora"),
    "omoe": ComoeConfig.preset("omoe", r=4),
    "mola": ComoeConfig.preset("mola"),
}


def trained_adapter(config: ComoeConfig, folder, seed: int = 0):
    """A tiny LLaMA with `config`'s experts, B and routers drawn away from their zero / small start (as after
    training), saved to `folder`; returns the model."""
    model = get_comoe_model(tiny_llama(), config).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_V" in name or "router" in name or "lora_A" in name:
                param.normal_(0, 0.3)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("preset", list(SERVED))
def test_each_linear_adds_what_comoe_adds(tmp_path, preset):
    model = trained_adapter(SERVED[preset], tmp_path)
    adapter = ComoeAdapter.read(tmp_path)
    layers = model.comoe_layers()
    assert set(adapter.experts) == set(layers)
    torch.manual_seed(1)
    for name, layer in layers.items():
        x = torch.randn(3, 5, layer.in_features)
        with torch.no_grad():
            expected = (layer(x) - layer.base_layer(x)).reshape(15, -1)
            served = PackedMixture(
                [Slice(adapter.experts[name], slice(None), 0)], layer.out_features, adapter.routing
            )(x)
        assert served.abs().max() > 1e-3  # the experts contribute
        torch.testing.assert_close(served, expected, rtol=1e-5, atol=1e-5)


def test_packed_and_sharded_slices_are_each_linears_columns(tmp_path):
    """q/k/v packed in one layer's output, and each tensor-parallel rank's shard of it (column parallel:
    its output columns; row parallel: its input columns, the shrink summed over ranks), equal the
    per-linear mixtures."""
    model = trained_adapter(SERVED["comoe"], tmp_path)
    adapter = ComoeAdapter.read(tmp_path)
    names = [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    layers = model.comoe_layers()
    x = torch.randn(7, 64)
    with torch.no_grad():
        full = torch.cat([(layers[n](x) - layers[n].base_layer(x)) for n in names], dim=-1)
        sizes = [layers[n].out_features for n in names]
        for rank in range(2):
            local = [size // 2 for size in sizes]
            slices = [
                Slice(adapter.experts[n], slice(rank * local[i], (rank + 1) * local[i]), sum(local[:i]))
                for i, n in enumerate(names)
            ]
            columns = torch.cat(
                [
                    torch.arange(sum(sizes[:i]) + rank * local[i], sum(sizes[:i]) + (rank + 1) * local[i])
                    for i in range(3)
                ]
            )
            served = PackedMixture(slices, sum(local), adapter.routing)(x)
            torch.testing.assert_close(served, full[:, columns], rtol=1e-5, atol=1e-5)
        down = "model.layers.0.mlp.down_proj"
        h = torch.randn(7, layers[down].in_features)
        expected = layers[down](h) - layers[down].base_layer(h)
        half = layers[down].in_features // 2
        shards = [
            PackedMixture(
                [Slice(adapter.experts[down], slice(None), 0, slice(r * half, (r + 1) * half))],
                64,
                adapter.routing,
            )
            for r in range(2)
        ]
        partial = [s.shrink for s in shards]
        reduced = h[:, :half] @ partial[0].t() + h[:, half:] @ partial[1].t()
        for rank, shard in enumerate(shards):
            shard.all_reduce = lambda _own, reduced=reduced: reduced  # the sum over both ranks
            torch.testing.assert_close(
                shard(h[:, rank * half : (rank + 1) * half]), expected, rtol=1e-5, atol=1e-5
            )


def test_omoe_orthonormalisation_is_comoes(tmp_path):
    from comoe.moe.banks import gram_schmidt_rows

    v = torch.randn(12, 40)
    torch.testing.assert_close(adapter_module.gram_schmidt_rows(v), gram_schmidt_rows(v), rtol=0, atol=0)


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"routing": "threshold"}, "routing='threshold'"),
        ({"expert_bank": "dora"}, "expert_bank='dora'"),
        ({"adapter_type": None}, "not a comoe adapter"),
    ],
)
def test_what_is_not_served_is_refused_by_name(tmp_path, change, named):
    trained_adapter(SERVED["soft"], tmp_path)
    _edit_config(tmp_path, **change)
    with pytest.raises(ValueError, match=named) as error:
        ComoeAdapter.read(tmp_path)
    assert "comoe generate" in str(error.value) or "enable-lora" in str(error.value)


def test_quantized_training_base_is_refused(tmp_path):
    trained_adapter(SERVED["soft"], tmp_path)
    (tmp_path / "comoe_data.json").write_text(json.dumps({"quantization": "4bit"}))
    with pytest.raises(ValueError, match="quantized"):
        ComoeAdapter.read(tmp_path)


def test_fingerprint_follows_the_weights(tmp_path):
    trained_adapter(SERVED["soft"], tmp_path)
    first = ComoeAdapter.read(tmp_path).fingerprint
    assert ComoeAdapter.read(tmp_path).fingerprint == first
    trained_adapter(SERVED["soft"], tmp_path, seed=1)
    assert ComoeAdapter.read(tmp_path).fingerprint != first


# Presets whose inference is not one routed LoRA mixture per linear: refused when the server starts.
NOT_SERVED = {"mixlora-ffn", "adamole", "milora", "comoe-dora", "moelora-liu"}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_routed_lora_mixture_preset_is_served_and_no_other(tmp_path, preset):
    # what the tiny model needs; `tasks` as `comoe train` records it for every preset that reads task ids
    fit = {"moelora-liu": {"tasks": ["a", "b"]}, "loramoe": {"tasks": ["a", "b"]}, "omoe": {"r": 4}}
    config = ComoeConfig.preset(preset, **fit.get(preset, {}))
    get_comoe_model(tiny_llama(), config).save_pretrained(tmp_path)
    if preset in NOT_SERVED:
        with pytest.raises(ValueError, match="comoe generate") as error:
            ComoeAdapter.read(tmp_path)
        if preset == "moelora-liu":
            assert "routing='task' is not served" in str(error.value)
    else:
        assert ComoeAdapter.read(tmp_path).experts


def test_slices_of_different_expert_counts_pack_as_their_own_mixtures():
    """The packed layer's general path (slices with different n or r) against each slice alone."""
    torch.manual_seed(0)
    experts = [
        adapter_module.Experts(torch.randn(n, 32), torch.randn(n, r, 32), torch.randn(n, r, d_out))
        for n, r, d_out in ((4, 8, 24), (2, 4, 16))
    ]
    routing = adapter_module.Routing(top_k=2, soft=False, normalize=True, scaling=2.0)
    x = torch.randn(9, 32)
    packed = PackedMixture([Slice(experts[0], slice(None), 0), Slice(experts[1], slice(None), 24)], 40, routing)
    alone = [PackedMixture([Slice(e, slice(None), 0)], e.out_features, routing)(x) for e in experts]
    torch.testing.assert_close(packed(x), torch.cat(alone, dim=-1), rtol=1e-5, atol=1e-5)
