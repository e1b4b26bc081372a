"""comoe.models.quantization: --load-in-4bit (QLoRA's NF4) and --load-in-8bit through transformers'
BitsAndBytesConfig, on this CPU: the base's linears become bitsandbytes layers, training records the
quantization in the adapter folder, and eval/generate of that adapter load the base the same way."""

import json

import pytest
import torch

from comoe.cli import main
from comoe.data.record import DATA_RECORD, trained_quantization
from comoe.evaluation.runner import load_for_eval
from comoe.evaluation.settings import EvalArgs, GenerateArgs
from comoe.models.loading import load_base
from comoe.models.quantization import QUANTIZATIONS, bnb_config, quantization_of_model
from comoe.settings import quantization_of, quantization_unset
from comoe.training import loop
from comoe.training.factory import build_model
from comoe.training.settings import TrainArgs
from tests.helpers import one_line_error

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
TRAIN = ["--max-steps", "2", "--train-limit", "2", "--batch-size", "2", "--cutoff", "64", "--save-steps", "0"]


def base_linears(model) -> dict[str, torch.nn.Module]:
    """The base model's attention and MLP linears (inside comoe's layers: their base layers)."""
    found = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in (*PROJECTIONS, "gate_proj", "up_proj", "down_proj"):
            found[name] = getattr(module, "base_layer", module)
    return found


def test_bnb_config_is_the_qlora_recipe_and_int8():
    four = bnb_config("4bit", torch.float32)
    assert four.load_in_4bit and not four.load_in_8bit
    assert (four.bnb_4bit_quant_type, four.bnb_4bit_use_double_quant) == ("nf4", True)
    assert four.bnb_4bit_compute_dtype == torch.bfloat16
    assert bnb_config("4bit", torch.bfloat16).bnb_4bit_compute_dtype == torch.bfloat16
    # under a float16 base the compute is float16 too: two half precisions are never mixed
    assert bnb_config("4bit", torch.float16).bnb_4bit_compute_dtype == torch.float16
    eight = bnb_config("8bit", torch.float32)
    assert eight.load_in_8bit and not eight.load_in_4bit
    assert QUANTIZATIONS == ("4bit", "8bit")
    with pytest.raises(ValueError, match="^quantization='2bit' is invalid: expected one of 4bit, 8bit$"):
        bnb_config("2bit", torch.float32)


@pytest.mark.parametrize(("quantization", "layer"), [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_load_base_quantizes_every_linear_but_the_head(tiny_model_dir, quantization, layer):
    model, _ = load_base(str(tiny_model_dir), quantization=quantization)
    linears = base_linears(model)
    assert len(linears) == 2 * 7 and {type(m).__name__ for m in linears.values()} == {layer}
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert quantization_of_model(model) == quantization
    assert model.config._name_or_path == str(tiny_model_dir)
    if quantization == "4bit":  # bitsandbytes' CPU inference repacking is off (see without_cpu_repacking)
        assert not any(m.support_avx512bf16_for_cpu for m in linears.values())
    reference, _ = load_base(str(tiny_model_dir))
    assert quantization_of_model(reference) is None
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        quantized, full = model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert quantized.dtype == torch.float32 and torch.isfinite(quantized).all()
    error = float((quantized - full).norm() / full.norm())
    # quantized: close to the full-precision model, not equal (measured: 0.12 for 4-bit NF4, 0.011 for 8-bit)
    assert 0 < error < {"4bit": 0.25, "8bit": 0.05}[quantization], error


def test_cli_trains_with_load_in_4bit_and_eval_loads_the_base_the_same_way(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    built = []

    def spy(args, **options):
        model, tokenizer = build_model(args, **options)
        built.append(model)
        return model, tokenizer

    monkeypatch.setattr(loop, "build_model", spy)
    argv = ["train", "--model", str(tiny_model_dir), *TRAIN, "--val-fraction", "0.5", "--eval-steps", "1"]
    assert main([*argv, "--load-in-4bit", "--output", str(tmp_path / "run")]) == 0
    (model,) = built
    linears = base_linears(model)
    assert {type(m).__name__ for m in linears.values()} == {"Linear4bit"}
    layer = model.comoe_layers()["model.layers.0.self_attn.q_proj"]
    assert type(layer.base_layer).__name__ == "Linear4bit" and layer.lora_A.dtype == torch.float32
    assert any(float(layer.lora_B.abs().sum()) > 0 for layer in model.comoe_layers().values())  # it trained
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / DATA_RECORD).read_text())["quantization"] == "4bit"
    assert trained_quantization(adapter) == "4bit"
    capsys.readouterr()

    eval_argv = [
        "eval",
        "--adapter",
        str(adapter),
        "--tasks",
        "chain_sum",
        "--limit",
        "2",
        "--mode",
        "generate",
    ]
    assert main([*eval_argv, "--max-new-tokens", "4", "--output", str(tmp_path / "eval.json")]) == 0
    out = capsys.readouterr().out
    assert f"loading the base quantized to 4bit, as {adapter} was trained" in out.splitlines()
    assert json.loads((tmp_path / "eval.json").read_text())["model"] == str(tiny_model_dir)
    loaded, _ = load_for_eval(None, str(adapter), device="cpu")
    assert {type(m).__name__ for m in base_linears(loaded).values()} == {"Linear4bit"}
    full, _ = load_for_eval(None, str(adapter), device="cpu", quantization=None)  # asked for: full precision
    assert {type(m).__name__ for m in base_linears(full).values()} == {"Linear"}


def test_a_validation_pass_keeps_the_gradient_through_frozen_4bit_linears(tiny_model_dir):
    """On CPUs with AVX512-BF16 a Linear4bit repacks itself in an eval-mode forward without gradients, and
    loses its backward; the MLPs' gradient reaches the first block's experts only if they stay unpacked."""
    model, _ = build_model(
        TrainArgs(model=str(tiny_model_dir), device="cpu", load_in_4bit=True, adapter_config={"r": 4})
    )
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # the validation pass
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    first = model.comoe_layers()["model.layers.0.self_attn.q_proj"]
    assert first.lora_B.grad is not None and first.lora_B.grad.abs().sum() > 0
    mlp = model.wrapped_model.model.layers[0].mlp.down_proj
    assert not getattr(mlp.weight.quant_state, "packing_format_for_cpu", False)


def test_the_8bit_record_loads_an_8bit_base_and_a_flag_overrides_it(tiny_model_dir, tmp_path, capsys):
    assert (
        main(["train", "--model", str(tiny_model_dir), *TRAIN, "--load-in-8bit", "--output", str(tmp_path)])
        == 0
    )
    adapter = tmp_path / "adapter"
    assert trained_quantization(adapter) == "8bit"
    capsys.readouterr()
    loaded, _ = load_for_eval(None, str(adapter), device="cpu")
    assert {type(m).__name__ for m in base_linears(loaded).values()} == {"Linear8bitLt"}
    four, _ = load_for_eval(None, str(adapter), device="cpu", quantization="4bit")
    assert {type(m).__name__ for m in base_linears(four).values()} == {"Linear4bit"}
    assert main(["generate", "--adapter", str(adapter), "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["prompt"] == "hi"
    assert "MatMul8bitLt" not in err  # LLM.int8's cast notice is filtered (comoe.cli.THIRD_PARTY_NOISE)


@pytest.mark.parametrize("command", ["train", "eval", "generate"])
def test_load_in_4bit_with_load_in_8bit_is_one_line(command, capsys, tmp_path):
    extra = {"train": ["--output", str(tmp_path)], "eval": [], "generate": ["--prompt", "hi"]}[command]
    message = one_line_error(capsys, [command, "--load-in-4bit", "--load-in-8bit", *extra])
    assert message == (
        "comoe: error: load_in_4bit and load_in_8bit are exclusive: the base is quantized to 4-bit NF4 or to "
        "8-bit, give one of them (run with --debug for the traceback)"
    )
    assert not (tmp_path / "config.yaml").exists()


def test_quantization_settings():
    assert quantization_of(TrainArgs()) is None and quantization_of(TrainArgs(load_in_4bit=True)) == "4bit"
    assert quantization_of(TrainArgs(load_in_8bit=True)) == "8bit"
    assert quantization_unset(EvalArgs()) and quantization_unset(GenerateArgs(prompt="x"))
    assert not quantization_unset(EvalArgs(load_in_4bit=False))  # given as false: full precision
    assert quantization_of(EvalArgs(load_in_8bit=True)) == "8bit"
    with pytest.raises(ValueError, match="^load_in_4bit and load_in_8bit are exclusive"):
        TrainArgs(load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ValueError, match=r"^load_in_4bit='yes' is invalid: expected true or false"):
        EvalArgs(load_in_4bit="yes")
    with pytest.raises(ValueError, match=r"^load_in_8bit=1 is invalid"):
        TrainArgs(load_in_8bit=1)
