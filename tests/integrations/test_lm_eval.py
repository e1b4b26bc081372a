"""lm-evaluation-harness with a comoe adapter: the registered `comoe` model gives the same accuracy as
`comoe eval` on the same local multiple-choice task, from Python and from lm-eval's own command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (pip install -e '.[integrations]')")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from comoe.adapter.model import get_comoe_model  # noqa: E402
from comoe.config import ComoeConfig  # noqa: E402
from comoe.evaluation.loglik import option_loglikelihoods  # noqa: E402
from comoe.evaluation.runner import load_for_eval, predict  # noqa: E402
from comoe.integrations.lm_eval import ComoeLM, write_choice_task  # noqa: E402
from comoe.models.loading import load_base  # noqa: E402
from tests.helpers import questions, task_routed  # noqa: E402

TASK = "comoe_parity"


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A comoe adapter on the tiny model, with experts that change the scores."""
    base, _ = load_base(str(tiny_model_dir))
    torch.manual_seed(0)
    model = get_comoe_model(base, ComoeConfig.preset("comoe", r=4, lora_dropout=0.0))
    with torch.no_grad():
        for layer in model.comoe_layers().values():
            layer.lora_B.normal_(0, 0.3)
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    return folder


def base_name(adapter_dir: Path) -> str:
    return json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]


def comoe_accuracy(adapter_dir, examples) -> float:
    model, tokenizer = load_for_eval(base_name(adapter_dir), str(adapter_dir))
    predictions = predict(model, tokenizer, examples, "loglik", batch_size=4)
    return sum(p.correct for p in predictions) / len(predictions)


def test_lm_eval_accuracy_with_the_comoe_model_equals_comoe_eval(adapter_dir, tmp_path):
    examples = questions(24, seed=3)
    lm = ComoeLM(adapter=str(adapter_dir), batch_size=4)
    write_choice_task(tmp_path, TASK, examples, lm.tokenizer.eos_token)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
        verbosity="ERROR",
    )
    expected = comoe_accuracy(adapter_dir, examples)
    assert 0 < expected < 1  # a task the comparison can get wrong
    assert results["results"][TASK]["acc,none"] == pytest.approx(expected)
    # The same model: per option, lm-eval's log-likelihood is comoe's plus one per-question constant
    # (it also scores the prompt's trailing newline).
    model, tokenizer = load_for_eval(base_name(adapter_dir), str(adapter_dir))
    ours, _ = option_loglikelihoods(model, tokenizer, examples, 4)
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    for mine, sample in zip(ours, samples, strict=True):
        offsets = [float(r[0]) - m for r, m in zip(sample["filtered_resps"], mine, strict=True)]
        assert max(offsets) - min(offsets) < 1e-3 and min(offsets) < 0


@pytest.mark.slow
def test_lm_eval_command_line_runs_the_comoe_model(adapter_dir, tmp_path):
    examples = questions(8, seed=4)
    _, tokenizer = load_base(
        json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    )
    write_choice_task(tmp_path, TASK, examples, tokenizer.eos_token)
    command = [
        sys.executable,
        "-m",
        "comoe.integrations.lm_eval",
        "run",
        "--model",
        "comoe",
        "--model_args",
        f"adapter={adapter_dir}",
        "--tasks",
        TASK,
        "--include_path",
        str(tmp_path),
        "--batch_size",
        "4",
        "--output_path",
        str(tmp_path / "out"),
    ]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    reports = list((tmp_path / "out").rglob("results*.json"))
    assert reports, done.stdout[-2000:]
    accuracy = json.loads(reports[0].read_text())["results"][TASK]["acc,none"]
    assert accuracy == pytest.approx(comoe_accuracy(adapter_dir, examples))


def test_comoe_lm_names_another_base_of_the_same_shapes_as_comoe_eval_does(adapter_dir, tmp_path, caplog):
    other = tmp_path / "other-base"
    base, tokenizer = load_base(base_name(adapter_dir))
    with torch.no_grad():
        for parameter in base.parameters():
            parameter.add_(0.01)
    base.save_pretrained(other)
    tokenizer.save_pretrained(other)
    with caplog.at_level("WARNING", logger="comoe"):
        ComoeLM(adapter=str(adapter_dir), pretrained=str(other), batch_size=1)
    assert f"was trained on base model {base_name(adapter_dir)}; running it on {other}" in caplog.text


def test_a_task_routed_adapter_runs_every_request_as_the_task_named(tiny_model_dir, tmp_path, caplog):
    base, _ = load_base(str(tiny_model_dir))
    torch.manual_seed(0)
    model = get_comoe_model(base, ComoeConfig.preset("moelora-liu", tasks=["a", "b"], lora_dropout=0.0))
    with torch.no_grad():
        for layer in model.comoe_layers().values():
            layer.lora_B.normal_(0, 0.3)
            layer.task_embedding.weight.normal_()
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        expected = {t: model(input_ids=ids, task_ids=torch.tensor([t, t])).logits for t in (1, -1)}
    lm = ComoeLM(adapter=str(tmp_path / "adapter"), task="b", batch_size=2)
    with torch.no_grad():
        torch.testing.assert_close(lm._model_call(ids), expected[1])
    with caplog.at_level("WARNING", logger="comoe"):
        unknown = ComoeLM(adapter=str(tmp_path / "adapter"), batch_size=2)
    assert "task=None is none of them" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(unknown._model_call(ids), expected[-1])


def test_an_adapter_that_reads_tasks_only_in_training_is_not_warned_of(tiny_model_dir, tmp_path, caplog):
    """loramoe's task vocabulary weighs its training loss only (its routing is per token): no task to name,
    no mean-gate warning."""
    task_routed(load_base(str(tiny_model_dir))[0], "loramoe").save_pretrained(tmp_path / "adapter")
    with caplog.at_level("WARNING", logger="comoe"):
        ComoeLM(adapter=str(tmp_path / "adapter"), batch_size=2)
    assert "routes by task" not in caplog.text
