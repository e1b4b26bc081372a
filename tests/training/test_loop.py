"""End to end on a tiny random LLaMA: train -> checkpoint -> resume -> save -> eval, and the loss path."""

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from comoe import ComoeConfig, get_comoe_model
from comoe.adapter.serialization import WEIGHTS_NAME
from comoe.cli import main
from comoe.data import builtin_examples
from comoe.data.collate import pad_batch, tokenize_example
from comoe.data.templates import format_prompt
from comoe.evaluation.runner import run_eval
from comoe.evaluation.settings import EvalArgs
from comoe.training.loop import optimizer_step, train
from comoe.training.loss import response_loss
from comoe.training.runlog import RunLog
from comoe.training.settings import TrainArgs
from tests.helpers import one_line_error, tiny_config, tiny_llama, train_args, write_jsonl


def test_response_loss_equals_full_head_loss(smol_tokenizer):
    model = get_comoe_model(tiny_llama(vocab=len(smol_tokenizer)), ComoeConfig(r=4, lora_dropout=0.0))
    with torch.no_grad():
        for layer in model.comoe_layers().values():
            layer.lora_B.normal_(0, 0.1)
    items = [
        tokenize_example(smol_tokenizer, format_prompt(e.instruction), e.output, 128)
        for e in builtin_examples("train", 2)
    ]
    batch = pad_batch(items, smol_tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        task, _ = response_loss(model, batch)
        full = model.wrapped_model(**batch).loss
    assert float(task) == pytest.approx(float(full), rel=1e-5)


def test_train_save_eval_end_to_end(tiny_model_dir, tmp_path):
    run = train(train_args(tiny_model_dir, tmp_path / "run"))
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3, 4]
    assert all(row["contrastive"] > 0 and row["task"] > 0 for row in log)
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (
        run / "checkpoints" / "step-000002"
    ).is_dir()
    assert list((run / "tensorboard").iterdir())
    report = run_eval(
        EvalArgs(
            model=str(tiny_model_dir),
            adapter=str(run / "adapter"),
            tasks=["chain_sum", "syllogism"],
            limit=3,
            mode="generate",
            max_new_tokens=4,
            output=str(tmp_path / "eval.json"),
        )
    )
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert set(saved["tasks"]) == {"chain_sum", "syllogism"} and saved["tasks"]["chain_sum"]["n"] == 3
    assert saved["adapter"] == str(run / "adapter") and report["average"] == saved["average"]


def test_resume_after_interruption_gives_the_same_adapter(tiny_model_dir, tmp_path, monkeypatch):
    straight = train(train_args(tiny_model_dir, tmp_path / "straight"))

    calls = {"n": 0}
    original = optimizer_step

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # dies during step 4, after the step-2 checkpoint
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr("comoe.training.loop.optimizer_step", interrupted)
    with pytest.raises(
        KeyboardInterrupt, match="interrupted at step 3 of 4; the last checkpoint is step-000002"
    ):
        train(train_args(tiny_model_dir, tmp_path / "resumed"))
    monkeypatch.setattr("comoe.training.loop.optimizer_step", original)
    resumed = train(train_args(tiny_model_dir, tmp_path / "resumed", resume=True))
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line)["step"] for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]  # rows of the interrupted run after its checkpoint are dropped


def test_dora_resumes_from_its_checkpoint_to_the_uninterrupted_adapter(tiny_model_dir, tmp_path, monkeypatch):
    straight = train(train_args(tiny_model_dir, tmp_path / "straight", preset="dora"))
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # dies during step 4, after the step-2 checkpoint
            raise KeyboardInterrupt
        return optimizer_step(*args, **kwargs)

    monkeypatch.setattr("comoe.training.loop.optimizer_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(train_args(tiny_model_dir, tmp_path / "resumed", preset="dora"))
    monkeypatch.setattr("comoe.training.loop.optimizer_step", optimizer_step)
    resumed = train(train_args(tiny_model_dir, tmp_path / "resumed", preset="dora", resume=True))
    a = load_file(straight / "adapter" / WEIGHTS_NAME)
    b = load_file(resumed / "adapter" / WEIGHTS_NAME)
    assert any("lora_magnitude_vector" in k for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_each_step_logs_the_learning_rate_it_was_taken_with(tiny_model_dir, tmp_path):
    run = train(
        train_args(tiny_model_dir, tmp_path / "run", max_steps=5, warmup_steps=2, lr=1e-3, save_steps=0, stats_steps=0)
    )
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    # linear warmup over 2 steps to 1e-3, then linear decay towards 0 over the remaining 3: steps 1 .. 5
    assert [row["lr"] for row in rows] == pytest.approx([5e-4, 1e-3, 1e-3, 2e-3 / 3, 1e-3 / 3])


def test_lora_baseline_trains_through_the_same_path(tiny_model_dir, tmp_path, monkeypatch):
    saves = []
    original = PeftModel.save_pretrained

    def save_pretrained(self, folder, **options):  # PEFT's "auto" would look the base up on the Hub
        where = Path(folder).relative_to(tmp_path / "lora").parts[0]
        saves.append((where, options.get("save_embedding_layers", "auto")))
        return original(self, folder, **options)

    monkeypatch.setattr(PeftModel, "save_pretrained", save_pretrained)
    val = {"val_fraction": 0.5, "eval_steps": 1, "save_best": True}  # best-adapter/ too
    run = train(train_args(tiny_model_dir, tmp_path / "lora", preset="lora", max_steps=2, save_steps=1, **val))
    # the step-1 checkpoint, best-adapter (written beside it first), the final adapter: none asks the Hub
    assert {where for where, _ in saves} == {"checkpoints", ".best-adapter.new", "adapter"}
    assert {flag for _, flag in saves} == {False}
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    report = run_eval(
        EvalArgs(
            model=str(tiny_model_dir),
            adapter=str(run / "adapter"),
            tasks=["syllogism"],
            limit=2,
            mode="generate",
            max_new_tokens=2,
        )
    )
    assert report["tasks"]["syllogism"]["n"] == 2


ROUTER_OPTIONS = "adapter_config: {aux_objectives: {router_z: 0.001}, router_jitter: 0.01}\n"
LORAMOE_TYPES = "adapter_config: {knowledge_tasks: [family_relationships]}\n"  # one built-in task
OMOE_TINY = "adapter_config: {r: 8}\n"  # 4 experts * r 8 = the tiny model's 32 k/v outputs (omoe's bound)


@pytest.mark.parametrize(
    ("preset", "yaml"),
    [
        ("hydralora", ""),
        ("moe", ROUTER_OPTIONS),
        ("dora", ""),
        ("omoe", OMOE_TINY),
        ("mola", ""),
        ("adamole", ""),
        ("milora", ""),
        ("comoe-dora", ""),
        ("mixlora-ffn", ""),
        ("moelora-liu", "val_fraction: 0.5\neval_steps: 2\n"),  # validation with the adapter's task ids
        ("loramoe", LORAMOE_TYPES),
    ],
    ids=[
        "hydralora",
        "moe-router-options",
        "dora",
        "omoe",
        "mola",
        "adamole",
        "milora",
        "comoe-dora",
        "mixlora-ffn",
        "moelora-liu",
        "loramoe",
    ],
)
def test_method_presets_train_from_the_command_line_and_their_folders_evaluate(
    tiny_model_dir, tmp_path, preset, yaml
):
    run = tmp_path / preset
    (tmp_path / "run.yaml").write_text(yaml or "seed: 0\n")
    argv = ["train", "--model", str(tiny_model_dir), "--preset", preset, "--train-limit", "2"]
    argv += ["--batch-size", "2", "--cutoff", "96", "--max-steps", "2", "--save-steps", "0"]
    assert main([*argv, "--config", str(tmp_path / "run.yaml"), "--output", str(run)]) == 0
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and all(math.isfinite(row["task"]) for row in rows)
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    if preset == "hydralora":
        assert (config["adapter_type"], config["expert_bank"], config["routing"]) == ("comoe", "hydra", "soft")
    if preset == "mola":  # 2 blocks in 4 depth groups: 2 experts in block 0, 6 in block 1
        assert (config["experts_by_depth"], config["num_experts"], config["top_k"]) == ([2, 4, 6, 8], 8, 2)
        shapes = {k: v.shape for k, v in load_file(run / "adapter" / WEIGHTS_NAME).items() if "q_proj" in k}
        assert [v[0] for k, v in sorted(shapes.items()) if k.endswith("lora_A")] == [2, 6]
    if preset == "omoe":
        assert (config["expert_bank"], config["routing"], config["r"]) == ("omoe", "soft", 8)
    if preset == "adamole":  # the threshold network saved beside each router; Switch balancing over active experts
        assert (config["routing"], config["num_experts"], config["r"]) == ("threshold", 8, 4)
        assert config["balance_weight"] == 0.001 and all(row["balance"] > 0 for row in rows)
        assert "model.layers.0.self_attn.q_proj.threshold.bias" in load_file(run / "adapter" / WEIGHTS_NAME)
    if preset == "milora":  # one decision per sequence from its prompt; evaluation generates with it below
        assert (config["routing"], config["num_experts"], config["top_k"]) == ("prompt", 4, 2)
    if preset == "comoe-dora":  # DoRA experts under CoMoE: a magnitude vector [n, d_out] per adapted linear
        assert (config["expert_bank"], config["contrastive"]) == ("dora", "comoe")
        assert all(row["contrastive"] > 0 for row in rows)
        shapes = {k: v.shape for k, v in load_file(run / "adapter" / WEIGHTS_NAME).items()}
        magnitudes = {k.removesuffix("lora_magnitude_vector"): v for k, v in shapes.items() if "magnitude" in k}
        assert len(magnitudes) == 8  # q/k/v/o in both blocks, each [experts, its d_out]
        assert all(v == (4, shapes[f"{k}lora_B"][2]) for k, v in magnitudes.items())
    if preset == "mixlora-ffn":  # FFN-block experts on each MLP (one router there), plain LoRA on q/k/v/o
        assert (config["ffn_experts"], config["num_experts"], config["balance_weight"]) == (["mlp"], 8, 0.001)
        assert all(row["balance"] > 0 for row in rows)
        shapes = {k: v.shape for k, v in load_file(run / "adapter" / WEIGHTS_NAME).items()}
        assert sorted(k for k in shapes if k.endswith("router.weight")) == [
            "model.layers.0.mlp.router.weight",
            "model.layers.1.mlp.router.weight",
        ]
        assert shapes["model.layers.0.mlp.down_proj.lora_A"] == (8, 16, 96)
    if preset == "dora":  # a PEFT folder: DoRA at the comoe preset's count, round((29696 - 192) / 448)
        assert (config["peft_type"], config["use_dora"], config["r"]) == ("LORA", True, 66)
        assert any("lora_magnitude_vector" in name for name in load_file(run / "adapter" / WEIGHTS_NAME))
    if preset in ("moelora-liu", "loramoe"):  # the training tasks recorded as the task vocabulary
        assert "syllogism" in config["tasks"] and len(set(config["tasks"])) == 5
    if preset == "moelora-liu":  # a task embedding [tasks, 64] and a gate [8, 64] per adapted linear
        assert math.isfinite(rows[-1]["val_loss"]) and math.isfinite(rows[-1]["val_loss/syllogism"])
        shapes = {k: v.shape for k, v in load_file(run / "adapter" / WEIGHTS_NAME).items()}
        assert shapes["model.layers.0.mlp.down_proj.task_embedding.weight"] == (5, 64)
        assert shapes["model.layers.0.mlp.down_proj.router.weight"] == (8, 64)
        assert shapes["model.layers.0.mlp.down_proj.lora_A"] == (8, 2, 96)
    if preset == "loramoe":  # dense routing on the FFN; the localized balancing constraint is logged
        assert (config["routing"], config["aux_objectives"]) == ("soft", {"loramoe": 0.1})
        assert config["knowledge_tasks"] == ["family_relationships"]
        assert all(row["localized_balance"] > 0 for row in rows)
    if preset in ("moelora-liu", "loramoe"):  # comoe eval maps the tasks to the adapter's ids
        report_path = tmp_path / "eval.json"
        eval_argv = ["eval", "--adapter", str(run / "adapter"), "--tasks", "syllogism,chain_sum"]
        eval_argv += ["--limit", "2", "--mode", "generate", "--max-new-tokens", "2", "--output", str(report_path)]
        assert main(eval_argv) == 0
        evaluated = json.loads(report_path.read_text())["tasks"]
        assert evaluated["syllogism"]["n"] == 2 and evaluated["chain_sum"]["n"] == 2
        # comoe generate --task: a trained task routes the prompts (moelora-liu); loramoe routes per token
        generate = ["generate", "--adapter", str(run / "adapter"), "--prompt", "hi", "--max-new-tokens", "2"]
        assert main([*generate, "--task", "syllogism"]) == (0 if preset == "moelora-liu" else 2)
    if yaml == ROUTER_OPTIONS:  # the router z-loss is logged; both options are recorded in the folder
        assert all(row["router_z"] > 0 for row in rows)
        assert (config["aux_objectives"], config["router_jitter"]) == ({"router_z": 0.001}, 0.01)
    report = run_eval(
        EvalArgs(adapter=str(run / "adapter"), tasks=["syllogism"], limit=2, mode="generate", max_new_tokens=2)
    )
    assert report["tasks"]["syllogism"]["n"] == 2


def test_yaml_config_with_flag_overrides(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("preset: moelora\nlr: 0.001\nbatch-size: 2\n")
    args = TrainArgs.from_sources(str(path), {"lr": 0.005, "seed": None})
    assert (args.preset, args.lr, args.batch_size) == ("moelora", 0.005, 2)
    path.write_text("lrate: 1\n")
    with pytest.raises(ValueError, match="unknown fields \\['lrate'\\]"):
        TrainArgs.from_sources(str(path), {})


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--preset", "comoe", "--batch-size", "0", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("comoe: error: --batch-size=0 is invalid") and "\n" not in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    assert main(["train", "--output", str(tmp_path / "busy")]) == 2
    assert "--resume" in capsys.readouterr().err


def test_gradient_norms_router_change_and_the_clipping_warning_are_logged(
    tiny_model_dir, tmp_path, capsys, caplog
):
    caplog.set_level(logging.INFO, logger="comoe")
    run = train(train_args(tiny_model_dir, tmp_path / "run", max_steps=4, stats_steps=2, max_grad_norm=1e-3))
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(row["grad_norm"] > 0 for row in log)  # every step, before clipping
    watched = [row for row in log if "grad_norm_task" in row]
    assert [row["step"] for row in watched] == [2, 4]
    for row in watched:
        assert (
            row["grad_norm_task"] > 0
            and row["grad_norm_contrastive"] >= 0
            and row["grad_norm_balance"] == 0.0
        )
        assert row["router_change"] > 0
    assert watched[1]["router_change"] > watched[0]["router_change"]
    clipped = [r for r in caplog.records if "was clipped to 0.001" in r.getMessage()]
    assert len(clipped) == 1  # said once, though every step was clipped
    assert clipped[0].levelno == logging.WARNING and clipped[0].name == "comoe.training.loop"
    started = [r for r in caplog.records if r.getMessage().startswith("training comoe on 20 examples")]
    assert len(started) == 1 and started[0].levelno == logging.INFO
    assert capsys.readouterr().out == ""  # the library logs; only the command line prints
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("comoe").handlers)


def test_router_lr_ratio_moves_the_routers_faster_and_resumes_exactly(tiny_model_dir, tmp_path, monkeypatch):
    fields = dict(max_steps=4, stats_steps=4, lr=1e-3)
    plain = train(train_args(tiny_model_dir, tmp_path / "plain", **fields))
    fast = train(train_args(tiny_model_dir, tmp_path / "fast", router_lr_ratio=10.0, **fields))
    change = [
        json.loads((r / "log.jsonl").read_text().splitlines()[-1])["router_change"] for r in (plain, fast)
    ]
    assert change[1] > 3 * change[0]

    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return optimizer_step(*args, **kwargs)

    monkeypatch.setattr("comoe.training.loop.optimizer_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(train_args(tiny_model_dir, tmp_path / "resumed", router_lr_ratio=10.0, **fields))
    monkeypatch.setattr("comoe.training.loop.optimizer_step", optimizer_step)
    resumed = train(
        train_args(tiny_model_dir, tmp_path / "resumed", router_lr_ratio=10.0, resume=True, **fields)
    )
    a = load_file(fast / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("preset", ["comoe", "lora", "comoe-dora", "moelora-liu"])  # moelora-liu: task ids
def test_bf16_base_with_gradient_checkpointing_trains_float32_adapters(tmp_path, tiny_model_dir, preset):
    run = train(
        train_args(
            tiny_model_dir,
            tmp_path / "run",
            preset=preset,
            dtype="bfloat16",
            gradient_checkpointing=True,
            max_steps=2,
            save_steps=0,
        )
    )
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0 for row in rows)
    tensors = load_file(run / "adapter" / "adapter_model.safetensors")
    assert tensors and {t.dtype for t in tensors.values()} == {torch.float32}


# ---- the model's context: training, validation and analysis cut at min(--cutoff, context) ------------------
def context_records(long: int, short: int) -> list[dict]:
    """`long` records of 41 tokens (a 21-token prompt) and `short` ones of 5, with SmolLM2's tokenizer."""
    rows = [
        {
            "prompt": f"Repeat the word after me, please, {' '.join(['sun'] * 10)} {i}:",
            "completion": " sun moon" * 10,
        }
        for i in range(long)
    ]
    return rows + [{"prompt": f"Say {i}:", "completion": " sun"} for i in range(short)]


def test_training_on_gpt2_cuts_at_its_context_of_32_and_counts_the_cut_examples(
    tiny_gpt2_dir, tmp_path, capsys
):
    data = write_jsonl(tmp_path / "c13.jsonl", context_records(long=5, short=3))
    held = write_jsonl(tmp_path / "held.jsonl", context_records(long=2, short=1))
    run = tmp_path / "run"
    argv = ["train", "--model", str(tiny_gpt2_dir), "--data", str(data), "--eval-data", str(held)]
    assert main([*argv, "--max-steps", "2", "--preset", "moe", "--output", str(run)]) == 0
    out = capsys.readouterr().out
    assert (
        "training moe on 8 examples (5 cut at 32 tokens, the model's context; --cutoff 256), validating on 3 "
        "(2 cut), 2 steps" in out
    )
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and math.isfinite(rows[-1]["val_loss"])
    assert all(row["batch_tokens"] <= 8 * 32 for row in rows)
    # analysis routes the same examples at --cutoff 256 by default: cut to the context as well
    analysis = [
        "analyze",
        "--model",
        str(tiny_gpt2_dir),
        "--adapter",
        str(run / "adapter"),
        "--data",
        str(data),
    ]
    assert main([*analysis, "--output", str(tmp_path / "analysis")]) == 0


def test_a_context_that_leaves_no_response_token_is_one_error_naming_it(tiny_gpt2_dir, tmp_path, capsys):
    long_prompts = [{"prompt": "sun " * 40, "completion": " moon"} for _ in range(2)]
    data = write_jsonl(tmp_path / "long.jsonl", long_prompts)
    argv = ["train", "--model", str(tiny_gpt2_dir), "--data", str(data), "--output", str(tmp_path / "run")]
    assert one_line_error(capsys, argv) == (
        "comoe: error: the model's context of 32 tokens (below --cutoff 256) leaves no response token in any "
        "of the 2 examples: their prompts fill it; shorten the prompts or use a model with a longer context "
        "(run with --debug for the traceback)"
    )
    assert not (tmp_path / "run").exists()  # a failed start leaves nothing behind


def test_a_llama_with_a_short_max_position_embeddings_is_cut_there(smol_tokenizer, tmp_path, caplog):
    folder = tmp_path / "llama-32"
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config(vocab_size=len(smol_tokenizer), max_position_embeddings=32)).save_pretrained(
        folder
    )
    smol_tokenizer.save_pretrained(folder)
    data = write_jsonl(tmp_path / "c.jsonl", context_records(long=3, short=1))
    with caplog.at_level(logging.INFO, logger="comoe"):
        run = train(train_args(folder, tmp_path / "run", data=[str(data)], max_steps=2, cutoff=96))
    assert "on 4 examples (3 cut at 32 tokens, the model's context; --cutoff 96), 2 steps" in caplog.text
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert max(row["batch_tokens"] for row in rows) <= 4 * 32


def test_a_model_with_a_longer_context_keeps_the_cutoff(tiny_model_dir, tmp_path, caplog):
    data = write_jsonl(tmp_path / "c.jsonl", context_records(long=3, short=1))
    with caplog.at_level(logging.INFO, logger="comoe"):  # the tiny LLaMA's context is 128 positions
        train(train_args(tiny_model_dir, tmp_path / "run", data=[str(data)], max_steps=1, cutoff=30))
    assert "on 4 examples (3 cut at 30 tokens), 1 steps" in caplog.text
    assert "context" not in caplog.text


def test_a_task_vocabulary_that_lacks_a_training_task_is_refused(tiny_model_dir, tmp_path):
    config = {"r": 4, "num_experts": 4, "tasks": ["syllogism", "chain_sum"]}  # three built-in tasks missing
    args = train_args(
        tiny_model_dir, tmp_path / "run", preset="moelora-liu", adapter_config=config, max_steps=1
    )
    with pytest.raises(
        ValueError,
        match=r"tasks: \['syllogism', 'chain_sum'\] \(the adapter's task vocabulary\) "
        r"lacks the training tasks \['family_relationships', 'letter_counting', 'spell_backward'\]",
    ):
        train(args)


@pytest.mark.parametrize(("preset", "warned"), [("moelora-liu", True), ("loramoe", False)])
def test_validation_on_a_task_outside_the_vocabulary_is_warned_of(
    tiny_model_dir, tmp_path, caplog, preset, warned
):
    """--eval-data of a task the adapter was not trained on: routed by the mean gate, warned of as comoe eval
    and comoe analyze warn (moe.routing.warn_unseen_tasks); loramoe does not route by task: no warning."""
    rows = [{"task": "sum", "prompt": f"{i} + 1?", "completion": str(i + 1)} for i in range(4)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    held = write_jsonl(
        tmp_path / "val.jsonl",
        [rows[0], {"task": "capital", "prompt": "Capital of Peru?", "completion": "Lima"}],
    )
    args = train_args(
        tiny_model_dir, tmp_path / "run", preset=preset, data=[str(data)], eval_data=[str(held)], max_steps=1
    )
    with caplog.at_level(logging.WARNING, logger="comoe"):
        train(args)
    text = "tasks ['capital'] are not among the adapter's training tasks ['sum']: their validation examples"
    assert (text in caplog.text) is warned
    assert "'sum'] are not among" not in caplog.text  # a trained task is routed by its own gate


@pytest.mark.parametrize(("preset", "shown"), [("omoe", ["task"]), ("mixlora", ["task", "balance"])])
def test_the_progress_bar_names_only_the_adapters_components(
    tiny_model_dir, tmp_path, monkeypatch, preset, shown
):
    """omoe has neither balance nor contrastive: its bar shows the task loss alone (log.jsonl keeps both)."""
    seen = []
    original = RunLog.write

    def write(self, record, components=("task",)):
        seen.append(list(components))
        return original(self, record, components)

    monkeypatch.setattr(RunLog, "write", write)
    run = train(train_args(tiny_model_dir, tmp_path / "run", preset=preset, max_steps=1, save_steps=0))
    assert seen == [shown]
    (row,) = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert {"balance", "contrastive"} <= set(row)
