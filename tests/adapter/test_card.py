"""comoe.adapter.card: the README.md model card states the base model, the experts, the routing, the
objectives and how to load the adapter, from the config it is written with."""

import pytest

from comoe.adapter.card import CARD_NAME, model_card, write_model_card
from comoe.config import ComoeConfig


def header(card: str) -> list[str]:
    lines = card.splitlines()
    assert lines[0] == "---"
    return lines[1 : lines.index("---", 1)]


def test_the_card_states_the_base_model_and_the_experts():
    config = ComoeConfig.preset("comoe", r=8, target_modules=["q_proj", "v_proj"])
    card = model_card(config, "HuggingFaceTB/SmolLM2-135M-Instruct", {})
    assert header(card) == [
        "library_name: comoe",
        "tags: [comoe, lora, mixture-of-experts, peft]",
        "base_model: HuggingFaceTB/SmolLM2-135M-Instruct",
    ]
    assert "# comoe adapter: CoMoE (arXiv 2505.17553)" in card.splitlines()
    assert (
        "A mixture-of-LoRA-experts adapter for `HuggingFaceTB/SmolLM2-135M-Instruct`: 4 LoRA experts of rank 8 "
        "per adapted linear, top-2 routing, targets q_proj, v_proj; balance weight 0.0, contrastive objective "
        "'comoe' with weight 0.01. "
    ) in card
    assert "expert bank" not in card and "further objectives" not in card


@pytest.mark.parametrize(
    ("preset", "title", "numbers"),
    [
        ("moelora", "MoELoRA (arXiv 2402.12851)", "8 LoRA experts of rank 16"),
        ("moe", "MoE-LoRA without a contrastive objective", "contrastive objective 'none' with weight 0.01"),
        ("mixlora", "MoE-LoRA with load balancing without a contrastive objective", "balance weight 0.01"),
        ("comoe-dora", "CoMoE (arXiv 2505.17553) with DoRA experts", "4 DoRA experts of rank 16 per adapted"),
        ("hydralora", "HydraLoRA (arXiv 2404.19245) without a contrastive objective", "soft (dense) routing"),
        ("mola", "MoLA (arXiv 2402.08562) without a contrastive objective", "2/4/6/8 (by depth, bottom to top)"),
        ("omoe", "OMoE (arXiv 2501.10062) without a contrastive objective", "; expert bank 'omoe'"),
        ("adamole", "AdaMoLE (arXiv 2405.00361) without a contrastive objective", "learned-threshold (a variable"),
        ("milora", "MiLoRA (arXiv 2410.18035) without a contrastive objective", "prompt-aware top-2 (one decision"),
        (
            "moelora-liu",
            "MOELoRA of Liu et al. (arXiv 2310.18339) without a contrastive objective",
            "task-conditioned dense (MOELoRA, tasks: none recorded)",
        ),
        ("loramoe", "LoRAMoE (arXiv 2312.09979) without a contrastive objective", "soft (dense) routing"),
        (
            "mixlora-ffn",
            "MixLoRA (arXiv 2404.15159, FFN-block experts) without a contrastive objective",
            "8 LoRA experts of rank 16 per MLP (mlp), each a whole FFN with LoRA on its projections, top-2 "
            "routing, plain LoRA of rank 16 on the attention targets q_proj, k_proj, v_proj, o_proj; ",
        ),
    ],
)
def test_the_title_names_the_method_of_each_preset(preset, title, numbers):
    card = model_card(ComoeConfig.preset(preset), "base", {})
    assert f"# comoe adapter: {title}" in card.splitlines() and numbers in card


def test_without_a_base_model_the_header_has_none_and_the_text_says_its_base_model():
    card = model_card(ComoeConfig(), None, {})
    assert not any(line.startswith("base_model") for line in header(card))
    assert "for `its base model`:" in card


def test_another_expert_bank_further_objectives_and_notes_are_listed():
    config = ComoeConfig(expert_bank="shared_basis", aux_objectives={"orthogonality": 0.25, "entropy": 1e-4})
    notes = {"training data": "chain_sum, gcd (built-in)", "accuracy": "71.2%"}
    card = model_card(config, "base", notes)
    assert "; expert bank 'shared_basis'; further objectives orthogonality (0.25), entropy (0.0001). " in card
    lines = card.splitlines()
    at = lines.index("- **training data:** chain_sum, gcd (built-in)")
    assert lines[at + 1] == "- **accuracy:** 71.2%" and lines[at + 2] == "" and lines[at + 3] == "## Load"


def test_the_card_says_how_to_load_the_folder():
    card = model_card(ComoeConfig(), "base", {})
    assert 'model = AutoComoeModelForCausalLM.from_pretrained("path/to/this/folder")' in card
    assert "comoe eval --adapter path/to/this/folder" in card and card.endswith("\n")
    assert "task_ids" not in card and "--task" not in card


def test_the_card_of_a_task_routed_adapter_says_how_to_give_the_task():
    card = model_card(ComoeConfig.preset("moelora-liu", tasks=["a", "b"]), "base", {})
    load = card[card.index("## Load") :]
    assert "every call needs `task_ids`" in load and "task_routing(model, NAME)" in load
    assert "comoe generate --adapter path/to/this/folder --task NAME" in load and card.endswith("\n")


def test_write_model_card_writes_readme_md_and_replaces_an_older_one(tmp_path):
    (tmp_path / CARD_NAME).write_text("old card")
    config = ComoeConfig(num_experts=6, top_k=3)
    write_model_card(tmp_path, config, "base", {"note": "x"})
    assert CARD_NAME == "README.md"
    assert (tmp_path / CARD_NAME).read_text(encoding="utf-8") == model_card(config, "base", {"note": "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
