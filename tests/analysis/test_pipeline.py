"""comoe.analysis.pipeline: `comoe analyze` routes held-out examples through a comoe adapter and writes the
summary, the figures and the report; it refuses a PEFT adapter and bad data before loading a model."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from comoe.adapter.method import method_of
from comoe.adapter.model import get_comoe_model
from comoe.analysis import pipeline
from comoe.analysis.pipeline import analyze
from comoe.analysis.report import specialisation_section
from comoe.analysis.settings import AnalyzeArgs
from comoe.config import PRESETS, ComoeConfig
from comoe.models.loading import load_base
from comoe.training.loop import train
from tests.helpers import train_args


def saved_comoe(model_dir, folder) -> None:
    base, _ = load_base(str(model_dir))
    model = get_comoe_model(base, ComoeConfig(num_experts=4, top_k=2, r=2, lora_dropout=0.0))
    with torch.no_grad():
        for layer in model.comoe_layers().values():
            layer.lora_B.normal_(0, 0.3)
    model.save_pretrained(folder)


def test_analyze_writes_summary_report_and_figures(tiny_model_dir, tmp_path):
    run = train(train_args(tiny_model_dir, tmp_path / "run", max_steps=2))
    summary = analyze(
        AnalyzeArgs(
            model=str(tiny_model_dir),
            adapter=str(run / "adapter"),
            tasks=["chain_sum", "syllogism"],
            limit=4,
            output=str(tmp_path / "an"),
        )
    )
    saved = json.loads((tmp_path / "an" / "summary.json").read_text())
    assert saved["tasks"] == ["chain_sum", "syllogism"] and len(saved["layers"]) == 8
    layers = list(saved["layers"].values())
    for key in ("mi_task_expert_bits", "nmi_task_expert", "expert_similarity", "load_cv"):
        assert summary[f"mean_{key}"] == pytest.approx(sum(row[key] for row in layers) / len(layers))
    for figure in ("task_expert_heatmaps.png", "per_layer_curves.png"):
        data = (tmp_path / "an" / figure).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "I(task; expert)" in (tmp_path / "an" / "report.md").read_text()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all("mi_task_expert_bits" not in row for row in log)  # stats_steps=10 > 2 steps


def test_the_files_hold_what_analyze_returns(tiny_model_dir, tmp_path, monkeypatch):
    saved_comoe(tiny_model_dir, tmp_path / "adapter")
    drawn = []
    real_plot = pipeline.plot_summary

    def plot(summary, output):
        drawn.append(summary)
        return real_plot(summary, output)

    monkeypatch.setattr(pipeline, "plot_summary", plot)
    args = AnalyzeArgs(
        model=str(tiny_model_dir),
        adapter=str(tmp_path / "adapter"),
        tasks=["chain_sum", "syllogism"],
        limit=3,
        batch_size=2,
        output=str(tmp_path / "out"),
    )
    summary = analyze(args)
    out = tmp_path / "out"
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert drawn == [summary]
    figures = [out / "task_expert_heatmaps.png", out / "per_layer_curves.png"]
    assert (out / "report.md").read_text() == specialisation_section(summary, figures)
    assert sorted(p.name for p in out.iterdir()) == [
        "per_layer_curves.png",
        "report.md",
        "summary.json",
        "task_expert_heatmaps.png",
    ]
    assert (
        summary["examples"] == 6 and summary["limit"] == 3 and summary["tasks"] == ["chain_sum", "syllogism"]
    )
    assert (summary["model"], summary["adapter"], summary["data"], summary["data_dir"]) == (
        str(tiny_model_dir),
        str(tmp_path / "adapter"),
        None,
        None,
    )
    for row in summary["layers"].values():  # every real token routed to top-2 of 4 experts
        assert row["tokens"] > 0 and sum(row["load"]) == pytest.approx(1.0)
        assert all(sum(task_row) == pytest.approx(1.0) for task_row in row["task_expert_load"])


def test_a_peft_adapter_is_refused(tiny_model_dir, tmp_path):
    base, _ = load_base(str(tiny_model_dir))
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    args = AnalyzeArgs(
        model=str(tiny_model_dir),
        adapter=str(tmp_path / "lora"),
        tasks=["syllogism"],
        limit=2,
        output=str(tmp_path / "out"),
    )
    with pytest.raises(ValueError, match=r"analysis needs a comoe adapter \(routing\), not a PEFT one"):
        analyze(args)
    assert not (tmp_path / "out").exists()


def test_unknown_tasks_fail_before_the_model_is_loaded(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline, "load_for_eval", no_loading)
    args = AnalyzeArgs(
        adapter=str(tmp_path / "adapter"), tasks=["no_such_task"], output=str(tmp_path / "out")
    )
    with pytest.raises(ValueError, match="no_such_task"):
        analyze(args)


def test_a_task_routed_adapter_is_analysed_with_its_task_ids(tiny_model_dir, tmp_path, monkeypatch):
    base, _ = load_base(str(tiny_model_dir))
    config = ComoeConfig.preset("moelora-liu", tasks=["syllogism", "chain_sum"], lora_dropout=0.0)
    get_comoe_model(base, config).save_pretrained(tmp_path / "adapter")
    seen = []
    original = pipeline.SpecialisationAccumulator.update

    def update(self, records, *args, **kwargs):
        seen.extend(record.routing.probs for record in records.values())
        return original(self, records, *args, **kwargs)

    monkeypatch.setattr(pipeline.SpecialisationAccumulator, "update", update)
    adapter, output = str(tmp_path / "adapter"), str(tmp_path / "an")
    summary = analyze(AnalyzeArgs(adapter=adapter, tasks=["chain_sum", "syllogism"], limit=2, output=output))
    assert summary["tasks"] == ["chain_sum", "syllogism"] and len(summary["layers"]) == 2 * 7
    # every token of an example carries its task's gate: two distinct gates per layer call (2 tasks)
    assert seen and all(len({tuple(row.tolist()) for row in probs.round(decimals=5)}) == 2 for probs in seen)


def test_tasks_outside_a_task_routed_adapters_vocabulary_are_warned_of(tiny_model_dir, tmp_path, caplog):
    base, _ = load_base(str(tiny_model_dir))
    config = ComoeConfig.preset("moelora-liu", tasks=["syllogism", "chain_sum"], lora_dropout=0.0)
    get_comoe_model(base, config).save_pretrained(tmp_path / "adapter")
    adapter, output = str(tmp_path / "adapter"), str(tmp_path / "an")
    with caplog.at_level("WARNING", logger="comoe"):
        analyze(AnalyzeArgs(adapter=adapter, tasks=["chain_sum", "syllogism"], limit=1, output=output))
        assert "not among the adapter's training tasks" not in caplog.text
        analyze(AnalyzeArgs(adapter=adapter, tasks=["chain_sum", "letter_counting"], limit=1, output=output))
    warned = "tasks ['letter_counting'] are not among the adapter's training tasks ['syllogism', 'chain_sum']"
    assert warned in caplog.text


@pytest.mark.parametrize("preset", [name for name in PRESETS if name != "moelora-liu"])  # that one: above
def test_every_routed_preset_is_analysed(tiny_model_dir, tmp_path, preset):
    """docs/analysis.md: analyze supports every routed comoe preset (PEFT baselines are refused, above)."""
    base, _ = load_base(str(tiny_model_dir))
    # r = 4: OMoE's orthonormal rows must fit the tiny model's 32-wide k/v projections
    model = get_comoe_model(base, ComoeConfig.preset(preset, r=4, lora_dropout=0.0))
    model.save_pretrained(tmp_path / "adapter")
    adapter, output = str(tmp_path / "adapter"), str(tmp_path / "an")
    summary = analyze(AnalyzeArgs(adapter=adapter, tasks=["chain_sum", "syllogism"], limit=2, output=output))
    routed = method_of(model).routed_layers(model)  # mixlora-ffn: the MLPs, not its plain-LoRA targets
    assert sorted(summary["layers"]) == sorted(routed) and routed
    assert all(layer["tokens"] > 0 for layer in summary["layers"].values())
