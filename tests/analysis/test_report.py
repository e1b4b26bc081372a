"""comoe.analysis.report: the report.md section of a specialisation summary (the dict analyze() writes)."""

from pathlib import Path

from comoe.analysis.metrics import TOKEN_BUCKETS
from comoe.analysis.report import specialisation_section


def layer_row(mi: float, dead=(), **extra) -> dict:
    return {
        "tokens": 40,
        "load": [0.25, 0.25, 0.25, 0.25],
        "load_entropy_bits": 2.0,
        "max_load_entropy_bits": 2.0,
        "load_cv": 0.125,
        "dead_experts": list(dead),
        "collapsed": False,
        "routing_entropy_bits": 1.5,
        "mi_task_expert_bits": mi,
        "nmi_task_expert": mi / 2,
        "expert_similarity": 0.03125,
        "mi_token_expert_bits": 0.0625,
        "task_expert_load": [[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]],
        **extra,
    }


def summary(layers: dict) -> dict:
    return {
        "tasks": ["chain_sum", "syllogism"],
        "layers": layers,
        "mean_mi_task_expert_bits": 0.123456,
        "mean_nmi_task_expert": 0.061728,
        "mean_mi_token_expert_bits": 0.0625,
        "mean_expert_similarity": 0.03125,
        "mean_load_cv": 0.125,
        "model": "tiny",
        "examples": 8,
    }


def test_headline_numbers_are_the_summary_means():
    text = specialisation_section(summary({"model.layers.0.self_attn.q_proj": layer_row(0.5)}), [])
    lines = text.splitlines()
    assert lines[0] == "## Expert specialisation"
    assert "- mean I(task; expert): 0.1235 bits (6.17% of H(task))" in lines
    assert f"- mean I(token id mod {TOKEN_BUCKETS}; expert): 0.0625 bits" in lines
    assert "- mean pairwise cosine similarity of expert outputs: 0.0312" in lines
    assert "- mean load imbalance (coefficient of variation): 0.125" in lines


def test_the_table_ranks_layers_by_task_information_and_keeps_ten():
    mis = [0.1, 0.9, 0.5, 0.0, 0.7, 0.3, 0.2, 0.8, 0.6, 0.4, 0.05, 0.95]
    layers = {
        f"model.layers.{i}.self_attn.v_proj": layer_row(mi, dead=[3] if i == 1 else [])
        for i, mi in enumerate(mis)
    }
    text = specialisation_section(summary(layers), [])
    rows = [line for line in text.splitlines() if line.startswith("| model.")]
    assert len(rows) == 10
    ranked = sorted(range(12), key=lambda i: -mis[i])[:10]
    assert [row.split(" | ")[0] for row in rows] == [f"| model.layers.{i}.self_attn.v_proj" for i in ranked]
    assert rows[0] == "| model.layers.11.self_attn.v_proj | 0.9500 | 0.4750 | 0.0312 | 0.125 | - |"
    assert rows[1] == "| model.layers.1.self_attn.v_proj | 0.9000 | 0.4500 | 0.0312 | 0.125 | [3] |"
    assert "model.layers.3." not in text and "model.layers.10." not in text  # the two lowest are left out


def test_figures_are_linked_by_file_name():
    figures = [Path("/runs/an/task_expert_heatmaps.png"), Path("/runs/an/per_layer_curves.png")]
    text = specialisation_section(summary({"a.q_proj": layer_row(0.1)}), figures)
    assert "![task_expert_heatmaps](task_expert_heatmaps.png)" in text
    assert "![per_layer_curves](per_layer_curves.png)" in text
    assert "/runs/an" not in text and text.endswith("\n")
