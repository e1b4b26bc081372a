"""comoe.training.settings: TrainArgs defaults, the adapter it trains (preset plus overrides), the rules
between fields, and each bad value named with its range."""

import dataclasses

import pytest

from comoe.config import PRESETS, ComoeConfig
from comoe.training.settings import METHODS, TrainArgs
from comoe.validation import InvalidSetting


def test_defaults():
    args = TrainArgs()
    assert (args.model, args.preset, args.dtype, args.device) == ("smollm2-135m", "comoe", "float32", "auto")
    assert (args.epochs, args.max_steps, args.lr, args.router_lr_ratio) == (1.0, None, 2e-4, 1.0)
    assert (args.batch_size, args.grad_accum, args.cutoff, args.warmup_steps) == (8, 1, 256, 10)
    assert (args.save_steps, args.stats_steps, args.eval_steps, args.max_grad_norm) == (50, 10, 50, 1.0)
    assert (args.resume, args.save_best, args.skip_nonfinite, args.fsdp) == (False, False, False, False)
    assert args.adapter_config == {} and args.output == "runs/train"
    assert [*PRESETS, "lora", "dora"] == METHODS


@pytest.mark.parametrize("preset", list(PRESETS))
def test_the_adapter_is_the_preset(preset):
    assert TrainArgs(preset=preset).comoe_config() == ComoeConfig.preset(preset)


def test_lora_trains_at_the_comoe_presets_capacity_and_overrides_apply_on_top():
    assert TrainArgs(preset="lora").comoe_config() == ComoeConfig.preset("comoe")
    assert TrainArgs(preset="dora").comoe_config() == ComoeConfig.preset("comoe")
    args = TrainArgs(preset="moelora", adapter_config={"num_experts": 6, "r": 4})
    config = args.comoe_config()
    assert (config.num_experts, config.r, config.top_k, config.balance_weight) == (6, 4, 2, 0.01)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"top_k": 5}, "adapter_config: top_k=5 is invalid: expected 1 <= top_k <= num_experts (4)"),
        ({"r": "16"}, "adapter_config: r='16' is invalid: expected an integer >= 1"),
    ],
)
def test_bad_adapter_overrides_fail_when_the_settings_are_built(overrides, message):
    with pytest.raises(InvalidSetting, match="^" + message.replace("(", r"\(").replace(")", r"\)")) as info:
        TrainArgs(adapter_config=overrides)
    assert info.value.field == "adapter_config"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"grad_accum": 0}, "grad_accum=0 is invalid: expected an integer >= 1"),
        ({"warmup_steps": -1}, "warmup_steps=-1 is invalid: expected an integer >= 0"),
        ({"eval_steps": -1}, "eval_steps=-1 is invalid: expected an integer >= 0"),
        ({"seed": -1}, "seed=-1 is invalid: expected an integer >= 0"),
        ({"max_steps": 0}, "max_steps=0 is invalid: expected an integer >= 1"),
        ({"router_lr_ratio": 0.0}, "router_lr_ratio=0.0 is invalid: expected a finite number > 0.0"),
        ({"val_fraction": 1.0}, "val_fraction=1.0 is invalid: expected a finite number >= 0.0 and < 1.0"),
        ({"val_fraction": -0.1}, "val_fraction=-0.1 is invalid"),
        ({"max_grad_norm": -1.0}, "max_grad_norm=-1.0 is invalid: expected a finite number >= 0.0"),
        (
            {"preset": "vera"},
            "preset='vera' is invalid: expected one of 'comoe', 'moe', 'moelora', 'mixlora', 'mixlora-ffn', "
            "'hydralora', "
            "'omoe', 'mola', 'adamole', 'milora', 'comoe-dora', ",  # the presets added later follow
        ),
        ({"epochs": "1"}, "epochs='1' is invalid: expected a number"),
        ({"gradient_checkpointing": 1}, "gradient_checkpointing=1 is invalid: expected true or false"),
    ],
)
def test_bad_values_name_the_field_and_range(values, message):
    with pytest.raises(InvalidSetting) as info:
        TrainArgs(**values)
    assert str(info.value).startswith(message) and info.value.field == next(iter(values))


def test_an_unknown_adapter_override_lists_the_valid_fields():
    with pytest.raises(
        ValueError, match=r"^adapter_config: unknown fields \['experts'\]; valid fields: \['adapter_dtype'"
    ):
        TrainArgs(adapter_config={"experts": 4})


def test_zero_is_valid_where_it_means_off():
    args = TrainArgs(
        warmup_steps=0, save_steps=0, stats_steps=0, eval_steps=0, max_grad_norm=0.0, val_fraction=0.0
    )
    assert (args.save_steps, args.max_grad_norm) == (0, 0.0)


def test_rules_between_fields():
    assert TrainArgs(val_fraction=0.1, save_best=True).save_best
    assert TrainArgs(eval_data=["v.jsonl"], save_best=True).eval_data == ["v.jsonl"]
    with pytest.raises(ValueError, match="^eval_data and val_fraction are exclusive"):
        TrainArgs(eval_data=["v.jsonl"], val_fraction=0.1)
    with pytest.raises(
        ValueError, match="^save_best needs validation data: give --eval-data or --val-fraction$"
    ):
        TrainArgs(save_best=True)
    assert TrainArgs(fsdp=True).fsdp
    for values in ({"resume": True}, {"preset": "lora"}, {"preset": "dora"}):
        with pytest.raises(ValueError, match="^fsdp=True is invalid with resume or preset 'lora' or 'dora': "):
            TrainArgs(fsdp=True, **values)


def test_resumable_changes_are_fields_and_exclude_what_shapes_the_run():
    names = {f.name for f in dataclasses.fields(TrainArgs)}
    assert names >= TrainArgs.RESUMABLE_CHANGES
    assert not {"lr", "seed", "batch_size", "preset", "model", "adapter_config"} & TrainArgs.RESUMABLE_CHANGES


def test_from_sources_reads_the_older_adapter_key_and_flags_win(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("adapter: {r: 8}\nlr: 0.001\nbatch_size: 4\n")
    args = TrainArgs.from_sources(str(path), {"batch_size": 2, "lr": None})
    assert (args.adapter_config, args.lr, args.batch_size) == ({"r": 8}, 0.001, 2)
    assert args.comoe_config().r == 8
    with pytest.raises(InvalidSetting, match=r"^--lr=0.0 is invalid: expected a finite number > 0.0$"):
        TrainArgs.from_sources(str(path), {"lr": 0.0})
