"""Injection, forward with auxiliary losses, save/load, disable/unload, and the errors users hit."""

import itertools
import json
import re

import pytest
import torch
from torch import nn
from transformers import LlamaForSequenceClassification

from comoe import ComoeConfig, ComoeModel, get_comoe_model
from comoe.adapter.layer import ComoeLinear
from comoe.config import PRESETS
from comoe.objectives.reference import comoe_loss, load_balance_loss
from comoe.training.loss import response_loss
from tests.helpers import tiny_config, tiny_llama


def batch(seed=0, vocab=128, shape=(2, 10)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, shape, generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second row
    return ids, mask


def trained_comoe(config=None, steps=3, seed=0):
    model = get_comoe_model(tiny_llama(seed), config or ComoeConfig.preset("comoe", lora_dropout=0.0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    ids, mask = batch()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_injection_freezes_base_and_counts_parameters(tiny_model):
    model = get_comoe_model(tiny_model, ComoeConfig.preset("comoe"))
    layers = model.comoe_layers()
    assert len(layers) == 8 and all(
        name.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "o_proj") for name in layers
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or ("router" in n) for n in trainable)
    q = layers["model.layers.0.self_attn.q_proj"]
    assert (
        q.lora_A.shape == (4, 16, 64) and q.lora_B.shape == (4, 16, 64) and q.router.weight.shape == (4, 64)
    )


def test_initial_outputs_equal_the_base_model_exactly():
    ids, mask = batch()
    with torch.no_grad():
        ref = tiny_llama()(input_ids=ids, attention_mask=mask).logits
        out = get_comoe_model(tiny_llama(), ComoeConfig.preset("mixlora"))(
            input_ids=ids, attention_mask=mask
        ).logits
    assert torch.equal(out, ref)


def test_layers_to_transform_and_regex_targets(tiny_model):
    config = ComoeConfig(target_modules=r".*mlp\.(up|down)_proj", layers_to_transform=[1])
    names = sorted(get_comoe_model(tiny_model, config).comoe_layers())
    assert names == ["model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]


def test_works_on_sequence_classification_and_plain_modules():
    config = tiny_config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, vocab_size=64, num_labels=3, pad_token_id=0
    )
    torch.manual_seed(0)
    classifier = LlamaForSequenceClassification(config).eval()
    ids = torch.randint(1, 64, (2, 5))
    ref = classifier(ids).logits
    wrapped = get_comoe_model(classifier, ComoeConfig(target_modules=["q_proj", "v_proj"]))
    assert torch.equal(wrapped(ids).logits, ref)

    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    ref = plain(x)
    config = ComoeConfig(target_modules=["0", "2"], num_experts=2, top_k=1, r=2, balance_weight=0.1)
    wrapped = get_comoe_model(plain, config)
    assert isinstance(plain[0], ComoeLinear) and torch.equal(wrapped(x), ref)
    wrapped.train()  # no backbone to carry the auxiliary gradient: the caller gets the loss to add
    out = wrapped(x)
    aux = wrapped.weighted_aux_loss
    assert wrapped.last_aux_losses()["balance"] > 0 and aux.requires_grad
    assert wrapped.take_carried_aux_loss() is None and out.shape == ref.shape


def test_loss_is_task_plus_weighted_auxiliary_losses_over_real_tokens():
    config = ComoeConfig.preset("comoe", balance_weight=0.5, contrastive_weight=0.3, lora_dropout=0.0)
    model = trained_comoe(config)  # non-zero B so the contrastive loss is informative
    ids, mask = batch(seed=1)
    model.train()
    with model.record_routing() as records:
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
    aux = model.last_aux_losses()
    # Reference: task loss from the same forward with adapters; aux losses from materialised expert outputs.
    balance, contrastive = [], []
    for name, layer in model.comoe_layers().items():
        step = records[name]
        assert step.mask is not None and step.mask.sum() == mask.sum()
        balance.append(load_balance_loss(step.routing.probs, step.routing.indices, mask.reshape(-1).bool()))
        outputs = torch.einsum("tnr,nro->tno", step.z, layer.lora_B) * layer.scaling
        contrastive.append(
            comoe_loss(outputs, step.routing.indices, config.temperature, mask=mask.reshape(-1).bool())
        )
    expected_balance = torch.stack(balance).mean().item()
    expected_contrastive = torch.stack(contrastive).mean().item()
    assert aux["balance"] == pytest.approx(expected_balance, rel=1e-5)
    assert aux["contrastive"] == pytest.approx(expected_contrastive, rel=1e-4)
    expected = aux["task"] + 0.5 * expected_balance + 0.3 * expected_contrastive
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    # Padding tokens do not move the statistics: changing padded input ids leaves them unchanged.
    ids2 = ids.clone()
    ids2[1, :3] = (ids2[1, :3] + 7) % 128
    model(input_ids=ids2, attention_mask=mask, labels=ids2)
    assert model.last_aux_losses()["balance"] == pytest.approx(aux["balance"], rel=1e-5)


def test_save_and_load_restore_bit_identical_outputs(tmp_path):
    model = trained_comoe()
    ids, mask = batch(seed=2)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["adapter_type"] == "comoe" and saved["format_version"] == 1 and saved["num_experts"] == 4
    loaded = ComoeModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, expected)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_disable_adapters_and_unload_give_the_base_model():
    model = trained_comoe()
    ids, mask = batch()
    with torch.no_grad():
        base = tiny_llama()(input_ids=ids, attention_mask=mask).logits
        adapted = model(input_ids=ids, attention_mask=mask).logits
        assert not torch.allclose(adapted, base)
        with model.disable_adapters():
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base)
        unloaded = model.unload()
        assert not any(isinstance(m, ComoeLinear) for m in unloaded.modules())
        assert torch.equal(unloaded(input_ids=ids, attention_mask=mask).logits, base)


def hooks_of(model: nn.Module) -> dict[str, tuple[list, list]]:
    return {
        name: (list(m._forward_pre_hooks.values()), list(m._forward_hooks.values()))
        for name, m in model.named_modules()
    }


def test_unload_leaves_the_base_with_the_hooks_it_had_and_another_preset_runs():
    base = tiny_llama()
    before = hooks_of(base)
    ids, mask = batch()
    model = get_comoe_model(base, ComoeConfig.preset("moelora-liu", tasks=["a", "b"]))
    assert hooks_of(base) != before  # the backbone carries the model's hooks while wrapped
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 1]))
    unloaded = model.unload()
    assert hooks_of(unloaded) == before
    with torch.no_grad():  # without task_ids: the task-routed adapter's hooks are gone
        plain = unloaded(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(plain, tiny_llama()(input_ids=ids, attention_mask=mask).logits)
        again = get_comoe_model(unloaded, ComoeConfig.preset("milora"))
        assert again(input_ids=ids, attention_mask=mask).logits.shape == plain.shape
        assert hooks_of(again.unload()) == before


@pytest.mark.parametrize(
    ("task_ids", "reason"),
    [
        (torch.tensor([0, 1]), "of shape \\[1\\] or \\[1\\] \\(the call's batch\\).*got shape \\[2\\]"),
        (torch.tensor([1.7]), "got dtype torch.float32"),
        (torch.tensor([-2]), "each in -1 .. 4 \\(-1: a task outside the 5\\)"),
        (torch.tensor([9]), "each in -1 .. 4"),
    ],
)
def test_bad_task_ids_are_refused_naming_the_value_and_the_valid_range(task_ids, reason):
    model = get_comoe_model(tiny_llama(), ComoeConfig.preset("moelora-liu", tasks=list("abcde")))
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    message = f"^task_ids={re.escape(repr(task_ids.tolist()))} is invalid: expected integers.*{reason}"
    with torch.no_grad():
        model(input_ids=ids, task_ids=torch.tensor([4]))  # a valid id
        with pytest.raises(ValueError, match=message):
            model(input_ids=ids, task_ids=task_ids)
        with pytest.raises(ValueError, match=message):
            model.generate(input_ids=ids, task_ids=task_ids, max_new_tokens=1)
        with pytest.raises(ValueError, match=message), model.default_call_inputs(task_ids=task_ids):
            model.base_model(input_ids=ids)  # a direct backbone call takes the defaults


def test_merge_and_unload_explains_why_not():
    with pytest.raises(NotImplementedError, match="depends on each token"):
        get_comoe_model(tiny_llama(), ComoeConfig()).merge_and_unload()


def test_generate_runs_with_adapters():
    model = trained_comoe()
    ids, _ = batch()
    out = model.generate(input_ids=ids[:1], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 14)
    assert all(layer.record is None for layer in model.comoe_layers().values())


def test_target_that_matches_nothing_lists_close_matches(tiny_model):
    with pytest.raises(ValueError) as error:
        get_comoe_model(tiny_model, ComoeConfig(target_modules=["q_prj"]))
    message = str(error.value)
    assert "target_modules=['q_prj']" in message and "close matches: ['q_proj']" in message


def test_applying_twice_is_refused(tiny_model):
    get_comoe_model(tiny_model, ComoeConfig())
    with pytest.raises(ValueError, match="already"):
        get_comoe_model(tiny_model, ComoeConfig())


def test_non_linear_target_is_refused(tiny_model):
    with pytest.raises(ValueError, match="'model.layers.0.mlp' is a LlamaMLP"):
        get_comoe_model(tiny_model, ComoeConfig(target_modules=["mlp"]))


def test_adapter_on_another_model_size_lists_mismatches(tmp_path):
    trained_comoe().save_pretrained(tmp_path)
    other = tiny_config(hidden_size=32, intermediate_size=64, num_hidden_layers=3)
    with pytest.raises(ValueError) as error:
        ComoeModel.from_pretrained(type(tiny_llama())(other), tmp_path)
    differences = error.value.differences  # every one (the message names a few)
    # the file has blocks 0-1 of the 2-block model; the 3-block model also wants block 2
    assert "missing in file model.layers.2.self_attn.q_proj.lora_A" in differences
    assert not [d for d in differences if d.startswith("not in model")]
    assert (
        "shape mismatch model.layers.0.self_attn.q_proj.lora_A: saved (4, 16, 64), model (4, 16, 32)"
        in differences
    )
    assert "missing in file: " in str(error.value) and "not in model" not in str(error.value)


def test_corrupted_weights_give_a_clear_error(tmp_path):
    trained_comoe().save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        ComoeModel.from_pretrained(tiny_llama(), tmp_path)


def test_contrastive_weight_zero_trains_exactly_like_plain_moe():
    plain = trained_comoe(ComoeConfig.preset("moe", lora_dropout=0.0))
    zero = trained_comoe(ComoeConfig.preset("comoe", lora_dropout=0.0, contrastive_weight=0.0))
    for (name, a), (_, b) in zip(
        plain.adapter_state_dict().items(), zero.adapter_state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_trains_under_bfloat16_autocast_as_in_float32(preset):
    """Mixed precision (torch.autocast: Trainer's bf16=True, Accelerate's mixed_precision) runs the base's
    and the experts' matmuls in bfloat16 while the adapter's weights stay float32; every preset's loss and
    its adapter's gradients must then be those of the float32 step, to bfloat16's precision."""
    # r = 4 fits omoe's n * r <= 32 outputs here; two tasks for the presets that route or balance by task
    config = ComoeConfig.preset(preset, r=4, lora_dropout=0.0, tasks=["a", "b"])

    def step(autocast: bool):
        torch.manual_seed(0)
        model = get_comoe_model(tiny_llama(), config).train()
        with torch.no_grad():  # experts away from B = 0, so that the objectives have directions
            for name, param in model.named_parameters():
                if param.requires_grad and "lora_B" in name:
                    param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
        inputs = {name: torch.zeros(2, dtype=torch.long) for name in model.call_input_names}  # task ids
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids, **inputs).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach().float(), grads

    loss32, grads32 = step(False)
    loss16, grads16 = step(True)
    assert torch.isfinite(loss16) and abs(loss16 - loss32) < 2e-2 * abs(loss32)
    assert grads16.keys() == grads32.keys() and grads32
    for name, grad in grads32.items():
        assert grads16[name].dtype == grad.dtype == torch.float32, name  # the weights' own dtype
        if not grad.any():  # e.g. omoe's V while its A is still zero
            assert not grads16[name].any(), name
            continue
        cosine = torch.nn.functional.cosine_similarity(grads16[name].flatten(), grad.flatten(), dim=0)
        # the same direction, to bfloat16's precision (a top-k choice may flip for a near-tied token)
        assert cosine > 0.95, (name, float(cosine))


@pytest.mark.parametrize("bank", ["lora", "hydra", "omoe", "dora"])
def test_every_combination_of_the_seams_trains_or_is_refused_in_one_line(bank):
    """Each expert bank with every routing kind, contrastive objective, FFN-block experts or not, and an
    auxiliary objective or none: the adapter builds, takes a training step (finite task and auxiliary
    losses, a gradient on its parameters) and generates one eval forward, or the config is refused with
    one ValueError line. Anything else (an AttributeError deep in a bank, a shape error) is a bug of the
    combination: FFN-block DoRA experts were once one."""
    ids, mask = batch(seed=1, shape=(2, 6))
    trained = refused = 0
    for routing, contrastive, ffn, aux in itertools.product(
        ("topk", "soft", "threshold", "prompt", "task"),
        ("none", "comoe", "moelora"),
        (None, ["mlp"]),
        ({}, {"loramoe": 0.1}, {"router_z": 0.01}),
    ):
        fields = dict(expert_bank=bank, routing=routing, contrastive=contrastive, ffn_experts=ffn, r=4)
        try:
            config = ComoeConfig.preset("moe", **fields, aux_objectives=aux, tasks=["a", "b"])
            model = get_comoe_model(tiny_llama(), config).train()
        except ValueError as error:
            assert "\n" not in str(error), (fields, aux, str(error))
            refused += 1
            continue
        call = {name: torch.tensor([0, 1]) for name in model.call_input_names}
        task, auxiliary = response_loss(
            model, {"input_ids": ids, "attention_mask": mask, "labels": ids, **call}
        )
        (task + auxiliary).backward()
        assert torch.isfinite(task) and torch.isfinite(auxiliary), (fields, aux)
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), (fields, aux)
        with torch.no_grad():
            assert torch.isfinite(model.eval()(input_ids=ids, attention_mask=mask, **call).logits).all()
        trained += 1
    # the refusals are the documented ones: contrastive objectives with FFN-block experts, and (dora) FFN
    # experts of a bank that is not a LoRA update
    assert refused == 30 + (15 if bank == "dora" else 0) and trained == 90 - refused
