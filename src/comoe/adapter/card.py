"""The README.md model card of an adapter folder: what it is, how it was configured, how to load it.

Hub pages and people opening the folder read this first; it is written with every save, from the config
and whatever the trainer knows (training data, evaluation results), so it cannot drift from the weights.
"""

from __future__ import annotations

import os
from pathlib import Path

from comoe.config import ComoeConfig
from comoe.files import atomic_write_text

CARD_NAME = "README.md"
# The methods that an expert bank makes (titles of the cards of folders without a contrastive objective).
BANK_METHODS = {"hydra": "HydraLoRA (arXiv 2404.19245)", "omoe": "OMoE (arXiv 2501.10062)"}
# The methods that a routing kind makes.
ROUTING_METHODS = {"threshold": "AdaMoLE (arXiv 2405.00361)", "prompt": "MiLoRA (arXiv 2410.18035)"}
# The contrastive methods, and their experts when the bank is not plain LoRA ("CoMoE with DoRA experts").
CONTRASTIVE_METHODS = {"comoe": "CoMoE (arXiv 2505.17553)", "moelora": "MoELoRA (arXiv 2402.12851)"}
BANK_EXPERTS = {"lora": "LoRA", "dora": "DoRA", "hydra": "HydraLoRA", "omoe": "OMoE"}


def model_card(config: ComoeConfig, base_model: str | None, notes: dict[str, str]) -> str:
    """Markdown with a Hub metadata header (base_model, library_name, tags)."""
    plain = BANK_METHODS.get(config.expert_bank, "MoE-LoRA")
    if plain == "MoE-LoRA" and config.balance_weight > 0:  # the per-linear MixLoRA form: its balance loss
        plain = "MoE-LoRA with load balancing"
    if config.ffn_experts is not None:
        plain = "MixLoRA (arXiv 2404.15159, FFN-block experts)"
    plain = ROUTING_METHODS.get(config.routing, plain)
    if config.routing == "task":
        plain = "MOELoRA of Liu et al. (arXiv 2310.18339)"
    if "loramoe" in config.aux_objectives:
        plain = "LoRAMoE (arXiv 2312.09979)"
    if config.experts_by_depth is not None:
        plain = "MoLA (arXiv 2402.08562)" if config.expert_bank == "lora" else f"{plain} (MoLA depths)"
    method = CONTRASTIVE_METHODS.get(config.contrastive, f"{plain} without a contrastive objective")
    if config.contrastive in CONTRASTIVE_METHODS and config.expert_bank != "lora":
        method += f" with {BANK_EXPERTS.get(config.expert_bank, repr(config.expert_bank))} experts"
    header = ["---", "library_name: comoe", "tags: [comoe, lora, mixture-of-experts, peft]"]
    if base_model:
        header.append(f"base_model: {base_model}")
    header.append("---")
    routing = "soft (dense)" if config.routing == "soft" else f"top-{config.top_k}"
    if config.routing == "threshold":
        routing = "learned-threshold (a variable number of experts per token)"
    if config.routing == "prompt":
        routing = f"prompt-aware top-{config.top_k} (one decision per sequence, from its prompt)"
    if config.routing == "task":
        routing = f"task-conditioned dense (MOELoRA, tasks: {', '.join(config.tasks or ['none recorded'])})"
    experts = str(config.num_experts)
    if config.experts_by_depth is not None:
        experts = f"{'/'.join(map(str, config.experts_by_depth))} (by depth, bottom to top)"
    kind = "DoRA" if config.expert_bank == "dora" else "LoRA"  # hydra and omoe experts are LoRA products
    targets = ", ".join(config.target_modules)
    where, targeted = "per adapted linear", f"targets {targets}"
    if config.ffn_experts is not None:  # MixLoRA: the mixture is over whole MLPs, the targets get one LoRA
        where = f"per MLP ({', '.join(config.ffn_experts)}), each a whole FFN with LoRA on its projections"
        targeted = f"plain LoRA of rank {config.r} on the attention targets {targets}"
    settings = (
        f"{experts} {kind} experts of rank {config.r} {where}, {routing} routing, {targeted}; balance weight "
        f"{config.balance_weight}, contrastive objective '{config.contrastive}' with weight "
        f"{config.contrastive_weight}"
    )
    if config.expert_bank != "lora":
        settings += f"; expert bank '{config.expert_bank}'"
    if config.aux_objectives:
        further = ", ".join(f"{name} ({weight:g})" for name, weight in config.aux_objectives.items())
        settings += f"; further objectives {further}"
    lines = [
        *header,
        "",
        f"# comoe adapter: {method}",
        "",
        f"A mixture-of-LoRA-experts adapter for `{base_model or 'its base model'}`: {settings}. "
        "The full configuration is in adapter_config.json, the experts and routers in "
        "adapter_model.safetensors.",
        "",
        *(f"- **{key}:** {value}" for key, value in notes.items()),
        *([""] if notes else []),
        "## Load",
        "",
        "```python",
        "from comoe import AutoComoeModelForCausalLM",
        "",
        'model = AutoComoeModelForCausalLM.from_pretrained("path/to/this/folder")',
        "```",
        "",
        "or, with the base model in hand: `ComoeModel.from_pretrained(base_model, folder)`. From the command "
        "line: `comoe eval --adapter path/to/this/folder` (add `--model` if the base model moved).",
        "",
    ]
    if config.routing == "task":  # a call without task ids is refused (docs/methods/moelora-liu.md)
        lines += [
            "It routes by task: every call needs `task_ids` (LongTensor[B], ids into the `tasks` of "
            "adapter_config.json), or `with comoe.evaluation.generation.task_routing(model, NAME):` around "
            "the calls; from the command line `comoe generate --adapter path/to/this/folder --task NAME`.",
            "",
        ]
    return "\n".join(lines)


def write_model_card(
    directory: str | os.PathLike, config: ComoeConfig, base_model: str | None, notes: dict[str, str]
) -> None:
    atomic_write_text(Path(directory) / CARD_NAME, model_card(config, base_model, notes))
