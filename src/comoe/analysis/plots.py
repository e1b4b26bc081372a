"""Figures of a specialisation summary: task x expert heatmaps and per-block curves (PNG, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

from comoe.adapter.targeting import layer_index  # noqa: E402


def _by_module(layers: dict[str, Any]) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    """Layer rows grouped by module name (q_proj, ...) as (block index, row), for per-block curves."""
    groups: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for position, (name, row) in enumerate(layers.items()):
        block = layer_index(name)
        groups.setdefault(name.rsplit(".", 1)[-1], []).append((position if block is None else block, row))
    return groups


def plot_summary(summary: dict[str, Any], output: Path, heatmap_layers: int = 3) -> list[Path]:
    """Task x expert heatmaps for a few layers and per-layer curves of I(task; expert) and similarity."""
    names = list(summary["layers"])
    chosen = [
        names[round(i * (len(names) - 1) / max(1, heatmap_layers - 1))]
        for i in range(min(heatmap_layers, len(names)))
    ]
    written = []
    fig, axes = plt.subplots(1, len(chosen), figsize=(4.2 * len(chosen), 0.5 * len(summary["tasks"]) + 2))
    for ax, name in zip(list(getattr(axes, "flat", [axes])), chosen, strict=True):
        table = summary["layers"][name]["task_expert_load"]
        image = ax.imshow(table, cmap="viridis", vmin=0, aspect="auto")
        ax.set_title(name.replace("model.layers.", "L").replace(".self_attn", ""), fontsize=9)
        ax.set_yticks(range(len(summary["tasks"])), summary["tasks"], fontsize=8)
        ax.set_xticks(range(len(table[0])), [f"E{i}" for i in range(len(table[0]))], fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle("fraction of each task's routed tokens per expert")
    fig.tight_layout()
    written.append(output / "task_expert_heatmaps.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for module, rows in _by_module(summary["layers"]).items():
        blocks = [block for block, _ in rows]
        top.plot(blocks, [row["mi_task_expert_bits"] for _, row in rows], marker=".", label=module)
        bottom.plot(blocks, [row["expert_similarity"] for _, row in rows], marker=".", label=module)
    top.set_ylabel("I(task; expert), bits")
    bottom.set_ylabel("mean expert cosine similarity")
    bottom.set_xlabel("transformer block")
    top.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    written.append(output / "per_layer_curves.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written
