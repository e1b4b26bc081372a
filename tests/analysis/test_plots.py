"""comoe.analysis.plots: which layers get heatmaps, what each heatmap and curve shows, and the PNG files."""

import numpy as np
import pytest

from comoe.analysis import plots
from comoe.analysis.plots import _by_module, plot_summary

PNG = b"\x89PNG\r\n\x1a\n"


def summary(blocks: int, modules=("q_proj", "v_proj"), tasks=("chain_sum", "syllogism", "gcd")) -> dict:
    """What analyze() writes, reduced to what the figures read: per layer the task x expert load, I(task;
    expert) and the expert similarity (distinct values per layer, to tell them apart)."""
    layers = {}
    for block in range(blocks):
        for m, module in enumerate(modules):
            value = block + m / 10
            layers[f"model.layers.{block}.self_attn.{module}"] = {
                "task_expert_load": [[value + t / 10 + e / 100 for e in range(4)] for t in range(len(tasks))],
                "mi_task_expert_bits": value,
                "expert_similarity": -value,
            }
    return {"tasks": list(tasks), "layers": layers}


@pytest.fixture
def figures(monkeypatch):
    """The figures plot_summary draws, kept when it closes them."""
    kept = []
    real_close = plots.plt.close

    def keep(fig):
        kept.append(fig)
        real_close(fig)

    monkeypatch.setattr(plots.plt, "close", keep)
    return kept


def test_heatmaps_show_the_first_middle_and_last_layer_with_their_tables(tmp_path, figures):
    data = summary(blocks=4)  # 8 layers: positions 0, 4 (round(3.5)) and 7
    written = plot_summary(data, tmp_path)
    assert written == [tmp_path / "task_expert_heatmaps.png", tmp_path / "per_layer_curves.png"]
    for path in written:
        assert path.read_bytes()[:8] == PNG
    heat = figures[0]
    axes = [ax for ax in heat.axes if ax.get_images()]  # the colorbars are axes too
    assert [ax.get_title() for ax in axes] == ["L0.q_proj", "L2.q_proj", "L3.v_proj"]
    names = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.2.self_attn.q_proj",
        "model.layers.3.self_attn.v_proj",
    ]
    for ax, name in zip(axes, names, strict=True):
        shown = np.asarray(ax.get_images()[0].get_array())
        assert np.allclose(shown, data["layers"][name]["task_expert_load"])
        assert [t.get_text() for t in ax.get_yticklabels()] == data["tasks"]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["E0", "E1", "E2", "E3"]


def test_curves_plot_each_module_over_its_blocks(tmp_path, figures):
    data = summary(blocks=3)
    plot_summary(data, tmp_path)
    top, bottom = figures[1].axes
    lines = {line.get_label(): line for line in top.get_lines()}
    assert set(lines) == {"q_proj", "v_proj"}
    assert list(lines["q_proj"].get_xdata()) == [0, 1, 2]
    assert list(lines["v_proj"].get_ydata()) == pytest.approx([0.1, 1.1, 2.1])
    similarity = {line.get_label(): list(line.get_ydata()) for line in bottom.get_lines()}
    assert similarity["q_proj"] == pytest.approx([0.0, -1.0, -2.0])
    assert top.get_ylabel() == "I(task; expert), bits" and bottom.get_xlabel() == "transformer block"


def test_a_single_layer_gets_one_heatmap(tmp_path, figures):
    data = summary(blocks=1, modules=("q_proj",), tasks=("only",))
    written = plot_summary(data, tmp_path)
    assert all(path.is_file() for path in written)
    assert [ax.get_title() for ax in figures[0].axes if ax.get_images()] == ["L0.q_proj"]


def test_layers_without_a_block_index_are_placed_by_position():
    rows = {"encoder.q_proj": {"a": 1}, "model.layers.5.self_attn.q_proj": {"a": 2}, "head.v_proj": {"a": 3}}
    groups = _by_module(rows)
    assert groups == {"q_proj": [(0, {"a": 1}), (5, {"a": 2})], "v_proj": [(2, {"a": 3})]}
