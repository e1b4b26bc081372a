"""Specialisation measures: the MI estimator on synthetic data, statistics against plain loops, the
statistics training logs (analyze() and its files are tested in test_pipeline.py)."""

import json
import math

import pytest
import torch

from comoe import ComoeConfig, get_comoe_model
from comoe.analysis.metrics import (
    SpecialisationAccumulator,
    entropy_bits,
    expert_similarity,
    mutual_information,
    mutual_information_from_counts,
    routing_stats,
    token_tasks,
)
from comoe.objectives.reference import cosine_similarity_matrix
from comoe.training.loop import train
from tests.helpers import tiny_llama, train_args


def test_mutual_information_independent_is_about_zero():
    g = torch.Generator().manual_seed(0)
    tasks, experts = torch.randint(0, 5, (20000,), generator=g), torch.randint(0, 8, (20000,), generator=g)
    assert mutual_information(tasks, experts) < 0.003
    # the correction removes most of the plug-in bias (about (5-1)(8-1)/(2 N ln 2) = 0.001 bits here)
    assert mutual_information(tasks, experts) < mutual_information(tasks, experts, bias_correction=False)


def test_mutual_information_of_a_deterministic_map_is_the_task_entropy():
    g = torch.Generator().manual_seed(1)
    tasks = torch.randint(0, 4, (5000,), generator=g)
    experts = torch.tensor([3, 0, 6, 1])[tasks]
    h_task = entropy_bits(torch.bincount(tasks))
    assert mutual_information(tasks, experts) == pytest.approx(h_task, abs=2e-3)
    assert h_task == pytest.approx(2.0, abs=0.01)


def test_mutual_information_matches_a_plain_formula():
    tasks = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])
    experts = torch.tensor([0, 1, 1, 1, 2, 2, 2, 0])
    n, plug_in = len(tasks), 0.0
    for t in range(3):
        for e in range(3):
            p_te = float(((tasks == t) & (experts == e)).sum()) / n
            if p_te:
                plug_in += p_te * math.log2(
                    p_te / (float((tasks == t).sum()) / n * float((experts == e).sum()) / n)
                )
    assert mutual_information(tasks, experts, bias_correction=False) == pytest.approx(plug_in)
    cells = len({(int(t), int(e)) for t, e in zip(tasks, experts, strict=True)})
    occupied = 3 + 3 - cells - 1  # occupied rows + columns - occupied cells - 1
    assert mutual_information(tasks, experts) == pytest.approx(
        max(0.0, plug_in + occupied / (2 * n * math.log(2)))
    )


def test_routing_stats_equal_plain_loops():
    g = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(50, 6, generator=g), -1)
    indices = probs.topk(2).indices
    mask = torch.rand(50, generator=g) > 0.2
    stats = routing_stats(indices, probs, mask)
    counts = [0] * 6
    for t in range(50):
        if mask[t]:
            for i in indices[t].tolist():
                counts[i] += 1
    load = [c / sum(counts) for c in counts]
    assert stats["load"] == pytest.approx(load)
    mean = sum(load) / 6
    assert stats["load_cv"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in load) / 6) / mean)
    entropies = [-sum(p * math.log2(p) for p in probs[t].tolist()) for t in range(50) if mask[t]]
    assert stats["routing_entropy_bits"] == pytest.approx(sum(entropies) / len(entropies))
    collapsed = routing_stats(torch.tensor([[0, 1]] * 10), torch.full((10, 6), 1 / 6))
    assert collapsed["collapsed"] and collapsed["dead_experts"] == [2, 3, 4, 5]


def test_expert_similarity_equals_materialised_outputs():
    g = torch.Generator().manual_seed(3)
    z, lora_B = torch.randn(30, 4, 8, generator=g), torch.randn(4, 8, 20, generator=g)
    outputs = torch.einsum("tnr,nro->tno", z, lora_B)
    cos = cosine_similarity_matrix(outputs)
    expected = float(torch.stack([cos[:, i, j] for i in range(4) for j in range(i + 1, 4)]).mean())
    assert expert_similarity(z, lora_B) == pytest.approx(expected, abs=1e-5)
    shared_B = torch.randn(1, 8, 20, generator=g).expand(4, -1, -1).contiguous()
    same_z = z[:, :1].expand(-1, 4, -1).contiguous()  # every expert identical: redundancy 1
    assert expert_similarity(same_z, shared_B) == pytest.approx(1.0, abs=1e-5)
    # materialised outputs (a bank whose outputs are not B z, e.g. DoRA experts) are taken as they are, masked
    other = torch.randn(30, 4, 20, generator=g)
    mask = torch.arange(30) % 3 > 0
    cos = cosine_similarity_matrix(other[mask])
    expected = float(torch.stack([cos[:, i, j] for i in range(4) for j in range(i + 1, 4)]).mean())
    assert expert_similarity(z, lora_B, mask, outputs=other) == pytest.approx(expected, abs=1e-5)


def test_accumulator_counts_equal_a_plain_loop():
    model = get_comoe_model(tiny_llama(), ComoeConfig(num_experts=4, top_k=2, r=4))
    ids = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[2, :2] = 0
    rows = torch.tensor([0, 1, 1])
    accumulator = SpecialisationAccumulator(model.comoe_layers(), ["a", "b"])
    with torch.no_grad(), model.record_routing() as records:
        model(input_ids=ids, attention_mask=mask)
        accumulator.update(records, token_tasks(rows, mask), ids)
    name = "model.layers.1.self_attn.v_proj"
    indices = records[name].routing.indices
    table, buckets = torch.zeros(2, 4), torch.zeros(64, 4)
    for token in range(21):
        if mask.reshape(-1)[token]:
            for e in indices[token].tolist():
                table[rows[token // 7], e] += 1
                buckets[int(ids.reshape(-1)[token]) % 64, e] += 1
    summary = accumulator.summary()
    assert torch.equal(accumulator.joint[name].float(), table)
    assert torch.equal(accumulator.token_joint[name].float(), buckets)
    assert summary["layers"][name]["mi_token_expert_bits"] == pytest.approx(
        mutual_information_from_counts(buckets.double())
    )
    assert summary["layers"][name]["mi_task_expert_bits"] == pytest.approx(
        mutual_information_from_counts(table.double())
    )
    assert summary["layers"][name]["tokens"] == 19


def test_accumulator_counts_only_the_active_experts_of_a_threshold_routing():
    """AdaMoLE's k = n layout: the task x expert table counts the (token, expert) pairs that are active."""
    torch.manual_seed(0)
    model = get_comoe_model(tiny_llama(), ComoeConfig.preset("adamole", lora_dropout=0.0))
    for layer in model.comoe_layers().values():
        with torch.no_grad():
            layer.router.weight.normal_(std=1.0)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    rows = torch.tensor([0, 1])
    accumulator = SpecialisationAccumulator(model.comoe_layers(), ["a", "b"])
    with torch.no_grad(), model.record_routing() as records:
        model(input_ids=ids, attention_mask=mask)
        accumulator.update(records, token_tasks(rows, mask), ids)
    name = "model.layers.0.self_attn.q_proj"
    active = records[name].routing.active
    table = torch.zeros(2, 8, dtype=torch.float64)
    for token in range(12):
        for expert in range(8):
            table[rows[token // 6], expert] += float(active[token, expert])
    assert 12 < table.sum() < 12 * 8  # a variable number of experts per token, neither 1 nor all
    assert torch.equal(accumulator.joint[name].double(), table)


def test_training_logs_routing_statistics(tiny_model_dir, tmp_path):
    run = train(
        train_args(
            tiny_model_dir, tmp_path / "run", max_steps=2, stats_steps=2, tasks=["chain_sum", "gcd"][:1]
        )
    )
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert "mi_task_expert_bits" not in log[0]
    assert log[1]["mi_task_expert_bits"] == 0.0  # a single task carries no information
    # top-2 of 4 distinct experts per token: load entropy in [1, 2] bits, CV at most 1 ([.5, .5, 0, 0])
    assert 1.0 <= log[1]["load_entropy_bits"] <= 2.0 and log[1]["load_cv"] <= 1.0
