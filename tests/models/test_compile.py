"""Compiling a model block by block: the blocks are the decoder layers, and a compiled comoe model trains
with the eager model's loss and gradients."""

import json

import pytest
import torch
from torch import nn

from comoe import ComoeConfig, get_comoe_model
from comoe.config import PRESETS
from comoe.evaluation import respond, runner
from comoe.evaluation.respond import run_generate
from comoe.evaluation.runner import run_eval
from comoe.evaluation.settings import EvalArgs, GenerateArgs
from comoe.models.compile import compile_blocks, repeated_blocks
from comoe.training.settings import TrainArgs
from tests.helpers import tiny_llama


def test_the_repeated_blocks_are_the_decoder_layers_and_a_model_without_them_is_refused():
    model = get_comoe_model(tiny_llama(), ComoeConfig.preset("comoe", r=4))
    blocks = repeated_blocks(model)
    assert blocks == list(model.wrapped_model.model.layers)
    with pytest.raises(ValueError, match="compile: Sequential names no repeated block"):
        compile_blocks(nn.Sequential(nn.Linear(2, 2)))
    assert TrainArgs(compile=True).compile and not TrainArgs().compile


@pytest.mark.slow  # inductor compiles C++ for the block (about 20 s on 2 cores)
def test_a_compiled_comoe_model_has_the_eager_loss_and_gradients():
    def trained_step(compiled):
        model = get_comoe_model(tiny_llama(), ComoeConfig.preset("comoe", r=4, lora_dropout=0.0)).train()
        with torch.no_grad():
            for layer in model.comoe_layers().values():
                layer.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        if compiled:
            assert compile_blocks(model) == 2
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        out.loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        return out.loss.detach(), model.last_aux_losses(), grads

    eager_loss, eager_aux, eager_grads = trained_step(False)
    loss, aux, grads = trained_step(True)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert aux["contrastive"] == pytest.approx(eager_aux["contrastive"], rel=1e-5)
    assert set(grads) == set(eager_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # inductor compiles the block twice (a static, then a dynamic sequence length)
def test_a_compiled_model_trains_over_varying_lengths_without_recompiling_after_the_second():
    """The first shape compiles a static graph and the second a dynamic one (torch's automatic dynamic
    shapes); eight more sequence lengths then reuse it: no recompilation, losses equal to eager's. The
    model is compiled before any eager call (a constant cached at the first traced call was a graph side
    effect)."""
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()
    counters.clear()

    def model():
        torch.manual_seed(0)
        built = get_comoe_model(tiny_llama(), ComoeConfig.preset("comoe", r=4, lora_dropout=0.0)).train()
        with torch.no_grad():
            for layer in built.comoe_layers().values():
                layer.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        return built

    compiled, eager = model(), model()
    compile_blocks(compiled)
    graphs = []
    for step, length in enumerate([12, 17, 9, 30, 21, 14, 25, 11, 19, 28]):
        ids = torch.randint(0, 128, (2, length), generator=torch.Generator().manual_seed(step))
        batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        loss = compiled(**batch).loss
        loss.backward()
        torch.testing.assert_close(loss, eager(**batch).loss, rtol=1e-5, atol=1e-6)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] > graphs[0] > 0  # the static graph, then the dynamic one
    assert graphs[2:] == [graphs[1]] * 8, graphs  # no recompilation after the second length


@pytest.mark.slow  # compiles the blocks for the prefill and the decode steps
def test_generate_and_eval_with_compile_give_the_eager_tokens(monkeypatch):
    torch.manual_seed(0)
    model = get_comoe_model(tiny_llama(), ComoeConfig.preset("comoe", r=4)).eval()
    with torch.no_grad():
        for layer in model.comoe_layers().values():
            layer.lora_B.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        eager = model.generate(input_ids=ids, **settings)
        compile_blocks(model)
        compiled = model.generate(input_ids=ids, **settings)
    assert torch.equal(compiled, eager)


def test_comoe_eval_and_generate_compile_the_model_they_run_when_asked(tiny_model_dir, tmp_path, monkeypatch):
    compiled = []
    for module in (runner, respond):  # a spy: which models would be compiled (compiling itself is above)
        monkeypatch.setattr(module, "compile_blocks", lambda model: compiled.append(type(model).__name__) or 1)
    run_generate(GenerateArgs(model=str(tiny_model_dir), prompt="hi", max_new_tokens=2, device="cpu"))
    assert compiled == []
    run_generate(
        GenerateArgs(model=str(tiny_model_dir), prompt="hi", max_new_tokens=2, device="cpu", compile=True)
    )
    assert compiled == ["LlamaForCausalLM"]
    data = tmp_path / "test.jsonl"
    row = {"prompt": "Colour of the sky?", "completion": " blue", "choices": [" red", " blue"]}
    data.write_text(json.dumps(row) + "\n")
    run_eval(EvalArgs(model=str(tiny_model_dir), data=[str(data)], device="cpu", compile=True))
    assert compiled == ["LlamaForCausalLM"] * 2


@pytest.mark.slow  # Dynamo traces each preset's blocks (aot_eager: no code generated; ~5 s each)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_traces_whole_and_trains_as_eager(preset):
    """Each preset's decoder block compiles without a graph break (routing kinds, expert banks, FFN
    experts, task ids), and a compiled training step has the eager loss and every gradient."""

    def trained_step(compiled):
        torch.manual_seed(0)
        config = ComoeConfig.preset(preset, r=4, lora_dropout=0.0, tasks=["a", "b"])
        model = get_comoe_model(tiny_llama(), config).train()
        with torch.no_grad():  # experts away from their zero initialisation, so every path carries signal
            for name, parameter in model.named_parameters():
                if parameter.requires_grad and ("lora_B" in name or "lora_V" in name):
                    parameter.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        if compiled:
            compile_blocks(model, backend="aot_eager")
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        for name in getattr(model, "call_input_names", ()):  # task ids for the task-routed presets
            inputs[name] = torch.tensor([0, 1])
        loss = model(**inputs).loss
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    eager_loss, eager_grads = trained_step(False)
    loss, grads = trained_step(True)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    torch.testing.assert_close(loss, eager_loss)
    assert set(grads) == set(eager_grads) and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-5, atol=1e-7)
