"""benchmarks/reproduce.py: paired statistics against a plain count, config variants, and a tiny end-to-end
run that must evaluate the untrained base once, train each method per seed and resume without rework."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from tests.helpers import DATA_DIR, needs_data

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "reproduce.py"
spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
reproduce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reproduce)


def run(method: str, seed: int, correct: dict[str, list[bool]]) -> dict:
    return {"method": method, "seed": seed, "correct": correct}


def test_paired_difference_matches_counting_and_brackets_the_mean():
    a = [run("a", 0, {"t": [True, True, False, True]}), run("a", 1, {"t": [True, False, False, True]})]
    b = [run("b", 0, {"t": [False, True, False, False]}), run("b", 1, {"t": [True, True, False, False]})]
    diff = reproduce.paired_difference(a, b)
    assert diff["mean"] == pytest.approx((3 - 1 + 2 - 2) / 8)
    assert diff["per_seed"] == pytest.approx([2 / 4, 0.0])
    assert diff["discordant"] == pytest.approx(4 / 8)
    # runs recorded in the order workers finished them: the per-seed differences are still in seed order
    assert reproduce.paired_difference(a[::-1], b)["per_seed"] == pytest.approx([2 / 4, 0.0])
    low, high = diff["ci95"]
    assert low <= diff["mean"] <= high and low < high


def test_seed_interval_is_students_t_over_the_per_seed_differences():
    # three seeds +1.5, -1.1, +2.3 points: mean 0.9, sample sd 1.778, t(0.975, 2 df) = 4.3027
    low, high = reproduce.seed_interval([0.015, -0.011, 0.023])
    half = 4.302652729911275 * 0.017776388834631 / 3**0.5
    assert (low, high) == (pytest.approx(0.009 - half), pytest.approx(0.009 + half))
    assert reproduce.seed_interval([0.02]) is None  # one seed has no spread to measure
    a = [run("a", 0, {"t": [True, True, False, True]}), run("a", 1, {"t": [True, False, False, True]})]
    b = [run("b", 0, {"t": [False, True, False, False]}), run("b", 1, {"t": [True, True, False, False]})]
    diff = reproduce.paired_difference(a, b)
    assert diff["seed_ci95"] == pytest.approx(reproduce.seed_interval([0.5, 0.0]))
    # t(0.975, 1 df) = 12.706 on two seeds gives [-292.7, +342.7] points, past what a difference of two
    # accuracies can be: the interval is clipped to the feasible [-100, +100]
    assert "[-100.0, +100.0]" in reproduce.difference_cells(diff)


def test_task_differences_are_per_seed_means_task_by_task_with_their_seed_interval():
    tasks = {"x": [True, True], "y": [False, False]}
    a = [
        run("a", 0, {"x": [True, True], "y": [True, False]}),
        run("a", 1, {"x": [True, False], "y": [True, True]}),
    ]
    b = [run("b", 0, {"x": [False, True], "y": [False, False]}), run("b", 1, tasks)]
    config = {
        "eval_tasks": ["x", "y"],
        "methods": {"base": None, "a": {}, "b": {}},
        "comparisons": [["a", "base"], ["a", "b"]],
    }
    by_method = {"base": [run("base", 0, tasks)], "a": a, "b": b}
    lines = reproduce.task_differences(by_method, config)
    assert len(lines) == 4  # blank, header, rule, one row: the untrained comparison has no seeds to spread
    # x: seed 0 +1/2, seed 1 -1/2 -> mean 0; y: seed 0 +1/2, seed 1 +1 -> mean 3/4
    x = reproduce.interval(reproduce.seed_interval([0.5, -0.5]))
    y = reproduce.interval(reproduce.seed_interval([0.5, 1.0]))
    assert lines[-1] == f"| a − b | +0.0 {x} | +75.0 {y} |"
    assert reproduce.paired_answers(a, b, tasks=["y"]) == [[1, 0], [1, 1]]


def test_questions_to_detect_follows_the_paired_power_formula():
    # a 10-point effect when half the answers differ: (1.96 + 0.84)^2 * 0.5 / 0.1^2 = 392
    assert abs(reproduce.questions_to_detect(0.5, effect=0.1) - 392) <= 1
    assert reproduce.questions_to_detect(0.0) == 0
    assert reproduce.questions_to_detect(0.1) > reproduce.questions_to_detect(0.05) > 3900


def test_seeds_to_detect_follows_the_same_formula_over_the_seed_spread():
    # per-seed differences -2.1, +4.4, +0.2 points: variance 10.86 points^2 -> 7.84 * 10.86 = 85.2 seeds
    assert reproduce.seeds_to_detect([-0.021, 0.044, 0.002]) == 86
    assert reproduce.seeds_to_detect([0.01, 0.01]) == 2  # no spread: the fewest that measure one
    assert reproduce.seeds_to_detect([0.01]) is None


def test_paired_difference_pairs_a_single_base_run_with_every_seed():
    a = [run("a", 0, {"t": [True, False]}), run("a", 1, {"t": [True, True]})]
    base = [run("base", 0, {"t": [False, False]})]
    assert reproduce.paired_difference(a, base, b_untrained=True)["mean"] == pytest.approx(3 / 4)
    # a trained method with one seed so far pairs only with that seed, not with every seed of a
    assert reproduce.paired_difference(a, base)["per_seed"] == [pytest.approx(1 / 2)]
    two_seeds = [run("b", 0, {"t": [True, True]}), run("b", 5, {"t": [False, False]})]
    assert reproduce.paired_difference(a, two_seeds)["mean"] == pytest.approx(-1 / 2)  # only seed 0 pairs
    assert reproduce.paired_difference(a, []) == {}


def test_compare_with_reuses_the_untrained_run_and_compares_each_method_with_itself(tmp_path, monkeypatch):
    """A longer budget on the same test questions: base is not evaluated again, and each trained method
    is paired with its own run of the other variant, seed by seed."""
    short = [
        run("base", 0, {"t": [False, False, True, False]}),
        run("lora", 0, {"t": [True, False, False, False]}),
    ]
    (tmp_path / "reproduce-short.json").write_text(json.dumps({"runs": short}))

    def train_lora(name, spec, seed, config, work):
        assert name == "lora", f"{name} must not run again"
        return run("lora", seed, {"t": [True, True, True, False]})

    monkeypatch.setattr(reproduce, "run_method", train_lora)
    monkeypatch.setattr(reproduce, "summarise", lambda results, config: "")
    config = {"seeds": [0], "methods": {"base": None, "lora": {"preset": "lora"}}, "compare_with": "short"}
    table = reproduce.reproduce(config, tmp_path / "reproduce-long.json", tmp_path / "work")
    runs = json.loads((tmp_path / "reproduce-long.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["base", "lora"] and runs[0]["from_variant"] == "short"
    assert "| lora | +50.0 |" in table and "| base |" not in table


def test_workers_sharing_a_results_file_keep_each_others_runs(tmp_path, monkeypatch):
    """Two workers on disjoint seeds: a run the other worker saves while this one trains survives this
    one's save, --methods restricts what runs, and a (method, seed) saved twice is kept once."""
    results_path = tmp_path / "reproduce-v.json"
    config = {
        "seeds": [0, 1],
        "methods": {"base": None, "lora": {"preset": "lora"}, "moe": {"preset": "moe"}},
    }

    def train(name, spec, seed, config, work):
        assert (name, seed) == ("lora", 1), f"{name} seed {seed} is not this worker's"
        reproduce.save_run(results_path, config, run("lora", 0, {"t": [True]}))  # the other worker
        return run(name, seed, {"t": [False]})

    monkeypatch.setattr(reproduce, "run_method", train)
    monkeypatch.setattr(reproduce, "summarise", lambda results, config: "")
    reproduce.reproduce(config, results_path, tmp_path / "work", seeds=[1], methods=["lora"])
    reproduce.save_run(results_path, config, run("lora", 1, {"t": [True]}))
    runs = json.loads(results_path.read_text())["runs"]
    assert sorted((r["method"], r["seed"], r["correct"]["t"][0]) for r in runs) == [
        ("lora", 0, True),
        ("lora", 1, False),
    ]


def scored(method: str, seed: int, answers: list[bool], **extra) -> dict:
    accuracy = sum(answers) / len(answers)
    return {**run(method, seed, {"t": answers}), "accuracy": {"t": accuracy}, "average": accuracy, **extra}


def test_paper_table_pairs_every_method_with_the_reference_and_counts_unrecorded_parameters(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from comoe.adapter.method import method_for
    from comoe.config import BASELINES, ComoeConfig

    lora = [scored("lora", s, [True, False, False, False]) for s in (0, 1, 2)]  # recorded no parameter count
    liu = [  # seed 0: +2 of 4 questions, seed 1: +1 of 4
        scored("moelora-liu", 0, [True, True, True, False], trainable_params=1234),
        scored("moelora-liu", 1, [True, True, False, False], trainable_params=1234),
    ]
    moe = [scored("moe", s, [True, True, False, False], trainable_params=99) for s in (0, 1, 2)]  # +1 of 4
    config = {
        "model": str(tiny_model_dir),
        "train_tasks": ["a", "b", "c"],
        "eval_tasks": ["t"],
        "methods": {
            "base": None,
            "lora": {"preset": "lora"},
            "moelora-liu": {"preset": "moelora-liu"},
            "moe": {"preset": "moe"},
        },
        "reference": "lora",
        "paper_averages": {"lora": 65.5},
    }
    rows = {
        line.split(" | ")[0]: line.split(" | ")
        for line in reproduce.paper_table(
            {"base": [scored("base", 0, [False] * 4)], "lora": lora, "moelora-liu": liu, "moe": moe}, config
        )[3:]
    }
    assert set(rows) == {"| lora", "| moelora-liu", "| moe"}  # the untrained base has no row
    # columns: method, parameters, seeds, t, average, seed 0, every seed, CI questions, CI seeds (t),
    # CI seeds (pooled spread), per seed, paper
    assert rows["| moelora-liu"][1:5] == ["1,234", "2", "62.5", "62.5"]
    assert rows["| moelora-liu"][5].startswith("+50.0 [")
    assert rows["| moelora-liu"][6] == "+37.5" and rows["| moelora-liu"][10] == "+50.0, +25.0"
    assert rows["| moelora-liu"][8] == "[-100.0, +100.0]"  # its own t interval, 1 df: clipped
    # pooled spread: squared deviations 0.03125 (moelora-liu, 1 df) and 0 (moe, 2 df): s_p = sqrt(0.03125 / 3),
    # t(0.975, 3 df) = 3.18245: +37.5 ± 22.97 points for two seeds, +25.0 ± 18.75 for three
    assert rows["| moelora-liu"][9] == "[+14.5, +60.5]" and rows["| moe"][9] == "[+6.2, +43.8]"
    assert rows["| moelora-liu"][11] == "- |" and rows["| lora"][11] == "65.5 |"
    assert rows["| lora"][2:7] == ["3", "25.0", "25.0", "-", "-"]
    # LoRA's count, from its preset on the meta device, is the trainable count of the model training builds
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    built = method_for("lora").build(base, ComoeConfig.preset(BASELINES["lora"]), False)
    expected = sum(p.numel() for p in built.parameters() if p.requires_grad)
    assert rows["| lora"][1] == f"{expected:,}"
    # a task-routed method is counted with the training tasks as its vocabulary, as training builds it
    counted = reproduce.counted_parameters({"preset": "moelora-liu"}, config)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    built = method_for("moelora-liu").build(
        base, ComoeConfig.preset("moelora-liu", tasks=["a", "b", "c"]), False
    )
    assert counted == sum(p.numel() for p in built.parameters() if p.requires_grad)
    assert counted != reproduce.counted_parameters(
        {"preset": "moelora-liu"}, {**config, "train_tasks": ["a"]}
    )
    assert reproduce.paper_table({"lora": lora}, {**config, "reference": None}) == []


def test_committed_config_variants_resolve_and_bad_ones_are_named():
    config_path = SCRIPT.with_name("reproduce.yaml")
    full = reproduce.load_config(config_path, None)
    assert full["seeds"] == [0, 1, 2] and set(full["methods"]) >= {"base", "lora", "moe", "comoe", "moelora"}
    math = reproduce.load_config(config_path, "math")
    assert math["train_tasks"] == ["math_data"] and math["eval_mode"] == "generate"
    assert "gsm8k" in math["eval_tasks"] and math["lr"] == full["lr"]
    for name, factor in (("builtin", 1), ("builtin_long", 4)):
        builtin = reproduce.load_config(config_path, name)
        assert builtin["data_dir"] is None and builtin["eval_mode"] == "generate"
        assert builtin["eval_limit"] >= 500 and builtin["train_limit"] == 200 * factor
        assert (
            reproduce.questions_to_detect(0.35, effect=0.02)
            <= builtin["eval_limit"] * len(builtin["eval_tasks"]) * 3
        )
    gpu = reproduce.load_config(config_path, "commonsense_gpu")  # every training example, on a GPU
    assert gpu["train_limit"] is None and gpu["device"] == "cuda" and gpu["dtype"] == "bfloat16"
    # 2 points are detectable at the 16% of questions that comoe and moe answered differently there
    assert reproduce.questions_to_detect(0.16, effect=0.02) <= gpu["eval_limit"] * len(gpu["eval_tasks"])
    with pytest.raises(
        ValueError, match="--variant 'nope'.*valid: builtin, builtin_long, commonsense_gpu, math, quick"
    ):
        reproduce.load_config(config_path, "nope")


def test_unknown_method_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"methods": {"base": None}, "full": {"methods": ["base", "lora"]}}))
    with pytest.raises(ValueError, match=r"methods: \['lora'\] not defined"):
        reproduce.load_config(path, None)


COMMONSENSE = {"train_tasks": ["boolq", "ARC-Easy"], "eval_tasks": ["boolq", "ARC-Easy"]}
MATH = {
    "train_tasks": ["math_data"],
    "eval_tasks": ["AddSub", "AQuA"],
    "eval_mode": "generate",
    "max_new_tokens": 4,
    "analysis_tasks": ["AddSub", "AQuA"],
}


BUILTIN = {
    "data_dir": None,
    "train_tasks": ["chain_sum", "syllogism"],
    "eval_tasks": ["chain_sum", "syllogism"],
    "eval_mode": "generate",
    "max_new_tokens": 4,
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "setting",
    [pytest.param(COMMONSENSE, marks=needs_data), pytest.param(MATH, marks=needs_data), BUILTIN],
    ids=["commonsense", "math", "builtin"],
)
def test_tiny_end_to_end_run_evaluates_base_once_and_resumes(setting, tmp_path, tiny_model_dir, monkeypatch):
    config = {
        "model": str(tiny_model_dir),
        "data_dir": str(DATA_DIR) if DATA_DIR.is_dir() else None,
        "train_limit": 2,
        "epochs": 1,
        "lr": 0.001,
        "batch_size": 2,
        "eval_limit": 3,
        "analysis_limit": 2,
        "seeds": [0, 1],
        "methods": {"base": None, "moe": {"preset": "moe", "train": {"router_lr_ratio": 2.0}}},
        "comparisons": [["moe", "base"]],
        "dtype": "bfloat16",
        "device": "cpu",
        **setting,
    }
    results_path = tmp_path / "results" / "reproduce-tiny.json"
    table = reproduce.reproduce(config, results_path, tmp_path / "work")
    runs = json.loads(results_path.read_text())["runs"]
    assert [(r["method"], r["seed"]) for r in runs] == [("base", 0), ("moe", 0), ("moe", 1)]
    for r in runs:
        assert set(r["accuracy"]) == set(setting["eval_tasks"])
        assert all(len(r["correct"][task]) == 3 for task in r["accuracy"])
    assert "specialisation" in runs[1] and "specialisation" not in runs[0]
    trained = yaml.safe_load((tmp_path / "work" / "moe-seed1" / "config.yaml").read_text())
    assert trained["router_lr_ratio"] == 2.0 and trained["seed"] == 1
    assert trained["dtype"] == "bfloat16" and trained["device"] == "cpu"  # the variant's placement
    assert "| moe − base |" in table and "| moe (n=2) |" in table
    assert results_path.with_suffix(".md").read_text() == table

    def no_rework(*args, **kwargs):
        raise AssertionError("a finished (method, seed) ran again")

    monkeypatch.setattr(reproduce, "run_method", no_rework)
    assert reproduce.reproduce(config, results_path, tmp_path / "work") == table
    config["seeds"] = [0, 1, 2]
    assert reproduce.reproduce(config, results_path, tmp_path / "work", run=False) == table


def test_committed_lora_control_for_mola_matches_its_count_targets_and_scaling(tiny_model_dir):
    """`lora_mola` (builtin): PEFT LoRA on MoLA's linears at MoLA's trainable-parameter count, alpha / r as
    MoLA's: the control that separates MoLA's routing from its targets and size."""
    from comoe.adapter.lora import matched_lora_config
    from comoe.config import BASELINES, ComoeConfig
    from tests.helpers import tiny_llama

    config = reproduce.load_config(SCRIPT.with_name("reproduce.yaml"), "builtin")
    assert {"lora_mola", "mola"} <= set(config["methods"]) and ["mola", "lora_mola"] in config["comparisons"]
    spec, mola = config["methods"]["lora_mola"], config["methods"]["mola"]
    setting = {"model": str(tiny_model_dir), "train_tasks": config["train_tasks"]}
    control, target = reproduce.counted_parameters(spec, setting), reproduce.counted_parameters(mola, setting)
    assert spec["preset"] == "lora" and abs(control - target) / target < 0.05, (control, target)
    adapter = ComoeConfig.from_preset(BASELINES[spec["preset"]], spec["adapter_config"])  # as training resolves it
    lora = matched_lora_config(adapter, tiny_llama())
    assert sorted(lora.target_modules) == sorted(ComoeConfig.preset("mola").target_modules)
    assert lora.lora_alpha / lora.r == ComoeConfig.preset("mola").scaling
