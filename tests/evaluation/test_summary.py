"""comoe.evaluation.summary: the markdown summary (accuracy beside chance and majority, predictions,
warnings, the paired comparison) and its plot, from hand-made reports."""

from comoe.evaluation.baselines import add_baselines
from comoe.evaluation.compare import compare_reports
from comoe.evaluation.scoring import Prediction, summarise
from comoe.evaluation.summary import summary_markdown, write_summary


def report(predicted: list[str], label: str) -> dict:
    answers = ["yes", "no"] * 5
    rows = [
        Prediction("boolq", a, p, a == p, question=f"q{i}", options=2)
        for i, (a, p) in enumerate(zip(answers, predicted, strict=True))
    ]
    made = {**summarise(rows), "model": "tiny", "mode": "loglik", "limit": 10, "seed": 0, "label": label}
    made["examples"] = [vars(r) for r in rows]
    add_baselines(made, {"boolq": {"examples": 20, "answers": {"no": 12, "yes": 8}}})
    return made


def test_summary_markdown_and_plot_of_two_models(tmp_path):
    collapsed = report(["no"] * 10, "lora")
    learned = report(["yes", "no"] * 4 + ["no", "no"], "comoe")
    comparison = compare_reports([[collapsed], [learned]], ["lora", "comoe"], samples=200)
    written = write_summary(tmp_path / "eval.json", [collapsed, learned], ["lora", "comoe"], comparison)
    assert [p.name for p in written] == ["eval.md", "eval.png"]
    assert written[1].read_bytes().startswith(b"\x89PNG")
    text = written[0].read_text()
    assert "| task | n | chance | majority | lora | comoe |" in text
    assert "| boolq | 10 | 50.0 | 50.0 ('yes') | 50.0 [23.7, 76.3] | 90.0 [59.6, 98.2] |" in text
    assert "| boolq | 50.0 [23.7, 76.3] | 50.0 ('no', 60% of training) | 'no' 100% | - |" in text
    assert "- lora: boolq: predictions collapsed: 'no' for 10 of 10 questions (100%)" in text
    assert "- comoe:" not in text and "### comoe − lora" in text and "**Verdict:**" in text
    assert text.rstrip().endswith("![accuracy per task](eval.png)")


def test_a_report_without_warnings_says_so():
    learned = report(["yes", "no"] * 5, "comoe")
    text = summary_markdown([learned], ["comoe"], None, None)
    assert "None: no task's predictions collapsed" in text and "Paired comparison" not in text
