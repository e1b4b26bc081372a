"""The markdown report of a specialisation summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from comoe.analysis.metrics import TOKEN_BUCKETS


def specialisation_section(summary: dict[str, Any], figures: list[Path]) -> str:
    """The report.md section: headline numbers and the layers with the most task-specific routing."""
    lines = [
        "## Expert specialisation",
        "",
        f"- mean I(task; expert): {summary['mean_mi_task_expert_bits']:.4f} bits "
        f"({100 * summary['mean_nmi_task_expert']:.2f}% of H(task))",
        f"- mean I(token id mod {TOKEN_BUCKETS}; expert): {summary['mean_mi_token_expert_bits']:.4f} bits",
        f"- mean pairwise cosine similarity of expert outputs: {summary['mean_expert_similarity']:.4f}",
        f"- mean load imbalance (coefficient of variation): {summary['mean_load_cv']:.3f}",
        "",
        "| layer | I(task; expert) bits | NMI | expert cos sim | load CV | dead experts |",
        "|---|---|---|---|---|---|",
    ]
    ranked = sorted(summary["layers"].items(), key=lambda kv: -kv[1]["mi_task_expert_bits"])
    for name, row in ranked[:10]:
        lines.append(
            f"| {name} | {row['mi_task_expert_bits']:.4f} | {row['nmi_task_expert']:.4f} | "
            f"{row['expert_similarity']:.4f} | {row['load_cv']:.3f} | {row['dead_experts'] or '-'} |"
        )
    lines += ["", *[f"![{f.stem}]({f.name})" for f in figures], ""]
    return "\n".join(lines)
