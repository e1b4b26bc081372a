"""ComoeConfig validation, presets and the matched LoRA baseline."""

import re

import pytest
from peft import get_peft_model

from comoe import ComoeConfig, get_comoe_model, matched_lora_config
from comoe.adapter.lora import comoe_trainable_parameters
from comoe.config import PRESETS
from comoe.training import factory
from tests.helpers import one_line_error, tiny_llama


@pytest.mark.parametrize(
    ("fields", "field_name", "range_text"),
    [
        (dict(top_k=5, num_experts=4), "top_k=5", "num_experts (4)"),
        (dict(top_k=0), "top_k=0", ">= 1"),
        (dict(r=0), "r=0", ">= 1"),
        (dict(num_experts=0, top_k=1), "num_experts=0", ">= 1"),
        (dict(temperature=0.0), "temperature=0.0", "> 0"),
        (dict(temperature=-1.0), "temperature=-1.0", "> 0"),
        (dict(contrastive="comoe", top_k=1), "top_k=1", "positive"),
        (dict(lora_dropout=1.0), "lora_dropout=1.0", "< 1.0"),
        (dict(routing="a b"), "routing='a b'", "a registered name"),
        (dict(contrastive="simclr"), "contrastive='simclr'", "'comoe'"),
        (dict(balance_weight=-0.1), "balance_weight=-0.1", ">= 0"),
        (dict(r=2.5), "r=2.5", "integer"),
        (dict(num_negatives=0), "num_negatives=0", ">= 1"),
        (dict(target_modules=[]), "target_modules=[]", "non-empty"),
    ],
)
def test_invalid_values_name_field_value_and_range(fields, field_name, range_text):
    with pytest.raises(ValueError) as error:
        ComoeConfig(**fields)
    assert field_name in str(error.value) and range_text in str(error.value)


def test_soft_routing_with_comoe_uses_all_experts_as_active():
    config = ComoeConfig(routing="soft", top_k=1, contrastive="comoe")
    assert config.active_experts == 4


@pytest.mark.parametrize(
    ("fields", "which"),
    [
        (dict(routing="soft"), "routing='soft' activates all 4"),
        (dict(routing="threshold"), "routing='threshold' activates all 4"),
        (dict(routing="task", tasks=["a"]), "routing='task' activates all 4"),
        (dict(top_k=4), "top_k=4 activates all 4"),
    ],
)
def test_comoe_with_every_expert_active_is_named_a_zero_objective(fields, which):
    """CoMoE's loss has no negatives when every expert is active: the config still builds (saved adapters
    load), and says why (training refuses it, get_comoe_model warns)."""
    assert which in ComoeConfig(contrastive="comoe", **fields).zero_objective
    assert ComoeConfig(contrastive="moelora", **fields).zero_objective is None


def test_no_preset_has_a_zero_objective_and_get_comoe_model_warns_of_one(caplog):
    assert all(ComoeConfig.preset(name, tasks=["a"]).zero_objective is None for name in PRESETS)
    get_comoe_model(tiny_llama(), ComoeConfig(contrastive="comoe", routing="soft", r=2))
    assert [record.levelname for record in caplog.records] == ["WARNING"]
    assert "so its loss is always 0" in caplog.records[0].getMessage()


def test_presets():
    comoe = ComoeConfig.preset("comoe")
    assert (comoe.num_experts, comoe.top_k, comoe.r, comoe.lora_alpha) == (4, 2, 16, 32.0)
    assert comoe.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert comoe.balance_weight == 0.0 and comoe.contrastive == "comoe" and comoe.contrastive_weight == 0.01
    mix = ComoeConfig.preset("mixlora")
    assert (mix.num_experts, mix.top_k, mix.balance_weight, mix.contrastive) == (8, 2, 0.01, "none")
    assert mix.ffn_experts is None and "ffn_experts" not in mix.to_dict()  # per-linear, folders as before
    ffn = ComoeConfig.preset("mixlora-ffn")  # MoE-PEFT's template and default coefficient (docs/methods/mixlora.md)
    assert (ffn.num_experts, ffn.top_k, ffn.r, ffn.lora_alpha, ffn.lora_dropout) == (8, 2, 16, 32.0, 0.05)
    assert (ffn.ffn_experts, ffn.objective_weights, ffn.target_modules) == (["mlp"], {"balance": 0.001}, comoe.target_modules)
    assert ComoeConfig.preset("moelora").contrastive == "moelora"
    hydra = ComoeConfig.preset("hydralora")  # the HydraLoRA release's defaults (docs/methods/hydralora.md)
    assert (hydra.num_experts, hydra.r, hydra.lora_alpha, hydra.lora_dropout) == (4, 4, 32.0, 0.05)
    assert (hydra.routing, hydra.expert_bank, hydra.active_experts) == ("soft", "hydra", 4)
    assert hydra.target_modules == ["gate_proj", "up_proj", "down_proj"] and hydra.objective_weights == {}
    assert ComoeConfig.preset("comoe", r=8).r == 8
    mola = ComoeConfig.preset("mola")  # MoLA-▽ (docs/methods/mola.md)
    assert (mola.experts_by_depth, mola.num_experts, mola.top_k, mola.r) == ([2, 4, 6, 8], 8, 2, 8)
    assert (mola.routing, mola.objective_weights) == ("topk", {})
    # the release's commands (GCYZSL/MoLA README): every attention and MLP linear, alpha 16, dropout 0.05
    assert mola.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (mola.lora_alpha, mola.lora_dropout) == (16.0, 0.05)
    omoe = ComoeConfig.preset("omoe")
    assert (omoe.num_experts, omoe.r, omoe.lora_alpha, omoe.routing, omoe.expert_bank) == (4, 16, 32, "soft", "omoe")
    with pytest.raises(ValueError, match="unknown value 'nope'"):
        ComoeConfig.preset("nope")
    with pytest.raises(ValueError, match="unknown fields \\['experts'\\]"):
        ComoeConfig.preset("comoe", experts=8)


def test_later_fields_at_their_defaults_are_left_out_of_the_saved_dict():
    saved = ComoeConfig().to_dict()
    assert not {"aux_objectives", "expert_bank", "router_jitter"} & set(saved)  # folders as before
    config = ComoeConfig(router_jitter=0.01, aux_objectives={"router_z": 0.001}, expert_bank="hydra")
    assert config.to_dict()["router_jitter"] == 0.01 and ComoeConfig.from_dict(config.to_dict()) == config


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown fields \\['num_expert'\\]"):
        ComoeConfig.from_dict({"num_expert": 4})


def test_every_field_is_documented():
    import dataclasses

    for field in dataclasses.fields(ComoeConfig):
        assert len(field.metadata.get("help", "")) > 20, field.name


def test_matched_lora_has_the_same_trainable_parameter_count(tiny_model):
    from tests.helpers import tiny_llama

    config = ComoeConfig.preset("comoe")
    lora = matched_lora_config(config, tiny_model)
    # tiny: hidden 64; q,o: 64->64, k,v: 64->32; 2 layers
    shapes = [(64, 64), (64, 32), (64, 32), (64, 64)] * 2
    comoe_total = sum(comoe_trainable_parameters(config, i, o) for i, o in shapes)
    assert lora.r == round(comoe_total / sum(i + o for i, o in shapes))
    peft_model = get_peft_model(tiny_llama(), lora)
    lora_total = peft_model.get_nb_trainable_parameters()[0]
    comoe_model_total = get_comoe_model(tiny_llama(), config).get_nb_trainable_parameters()[0]
    assert comoe_model_total == comoe_total
    assert abs(lora_total - comoe_total) <= sum(i + o for i, o in shapes) / 2
    assert lora.lora_alpha / lora.r == config.scaling


def test_experts_by_depth_splits_the_blocks_bottom_to_top_and_is_validated():
    config = ComoeConfig(num_experts=8, experts_by_depth=[2, 4, 6, 8])
    assert [config.experts_at(b, 4) for b in range(4)] == [2, 4, 6, 8]
    assert [config.experts_at(b, 30) for b in (0, 7, 8, 14, 15, 22, 23, 29)] == [2, 2, 4, 4, 6, 6, 8, 8]
    assert [config.experts_at(b, 2) for b in range(2)] == [2, 6]  # fewer blocks than groups
    assert config.experts_at(None, 4) == 8  # outside the blocks: num_experts
    layer = config.at_depth(1, 4)
    assert (layer.num_experts, layer.experts_by_depth, layer.r) == (4, None, config.r)
    assert ComoeConfig().at_depth(3, 4) == ComoeConfig() and ComoeConfig().experts_at(3, 4) == 4
    assert config.to_dict()["experts_by_depth"] == [2, 4, 6, 8]
    assert "experts_by_depth" not in ComoeConfig().to_dict()  # default folders unchanged
    assert ComoeConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"experts_by_depth=\[2, 4, 6, 8\] and num_experts=4 disagree"):
        ComoeConfig(num_experts=4, experts_by_depth=[2, 4, 6, 8])
    # the preset's num_experts is not the field the user changed: both are named, the changed one first
    with pytest.raises(ValueError, match=r"^experts_by_depth=\[2, 4, 6, 9\] and num_experts=8 disagree"):
        ComoeConfig.from_preset("mola", {"experts_by_depth": [2, 4, 6, 9]})
    with pytest.raises(ValueError, match="experts_by_depth"):
        ComoeConfig(num_experts=8, top_k=2, experts_by_depth=[1, 8])
    with pytest.raises(ValueError, match="experts_by_depth"):
        ComoeConfig(experts_by_depth=[])


def test_knowledge_tasks_outside_the_tasks_are_refused_from_python_and_before_training(
    capsys, tmp_path, tiny_model_dir, monkeypatch
):
    expected = (
        "knowledge_tasks=['wiki', 'news'] is invalid: expected names among the adapter's tasks ['qa', 'wiki']; "
        "not tasks: ['news']"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        ComoeConfig.preset("loramoe", tasks=["qa", "wiki"], knowledge_tasks=["wiki", "news"])
    assert ComoeConfig.preset("loramoe", knowledge_tasks=["news"]).tasks is None  # checked once tasks are known
    (tmp_path / "know.yaml").write_text("adapter_config: {knowledge_tasks: [nosuchtask]}\n")
    monkeypatch.setattr(factory, "load_base", lambda *a, **k: pytest.fail("the base model was loaded"))
    argv = ["train", "--model", str(tiny_model_dir), "--preset", "loramoe", "--train-limit", "2"]
    message = one_line_error(capsys, [*argv, "--config", str(tmp_path / "know.yaml"), "--output", str(tmp_path / "run")])
    assert "know.yaml: adapter_config: knowledge_tasks=['nosuchtask'] is invalid: expected names among" in message
    assert "family_relationships" in message and "not tasks: ['nosuchtask'] (run with --debug" in message
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_the_task_routed_presets_and_their_fields():
    liu = ComoeConfig.preset("moelora-liu")  # docs/methods/moelora-liu.md: R = 16 split into 8 experts of rank 2
    assert (liu.num_experts, liu.r, liu.lora_alpha, liu.scaling, liu.lora_dropout) == (8, 2, 4.0, 2.0, 0.1)
    assert (liu.routing, liu.active_experts, liu.task_embedding_dim, liu.tasks) == ("task", 8, 64, None)
    assert liu.target_modules[-3:] == ["gate_proj", "up_proj", "down_proj"] and liu.objective_weights == {}
    dou = ComoeConfig.preset("loramoe")  # docs/methods/loramoe.md
    assert (dou.num_experts, dou.r, dou.lora_alpha, dou.routing, dou.active_experts) == (8, 4, 32.0, "soft", 8)
    assert (dou.objective_weights, dou.localized_balance_delta, dou.knowledge_tasks) == ({"loramoe": 0.1}, 0.1, [])
    assert not {"tasks", "task_embedding_dim", "knowledge_tasks", "localized_balance_delta"} & set(
        ComoeConfig().to_dict()
    )  # default folders unchanged
    config = ComoeConfig.preset("loramoe", tasks=["a", "b"], knowledge_tasks=["b"], localized_balance_delta=0.2)
    assert ComoeConfig.from_dict(config.to_dict()) == config and config.to_dict()["tasks"] == ["a", "b"]
    for field, value, message in [
        ("tasks", [], "a non-empty list of task names or null"),
        ("tasks", ["a", "a"], "distinct task names"),
        ("tasks", "a", "a list of task names"),
        ("knowledge_tasks", [1], "a list of task names"),
        ("task_embedding_dim", 0, ">= 1"),
        ("localized_balance_delta", 1.0, "< 1"),
    ]:
        with pytest.raises(ValueError, match=f"{field}=.*{message}"):
            ComoeConfig(**{field: value})
