"""comoe.moe.routing: top-k gates renormalised, soft routing as the softmax, dense gates and the
expert-sorted layout against plain loops."""

import pytest
import torch
from safetensors.torch import load_file

from comoe import ComoeConfig, ComoeModel, get_comoe_model
from comoe.moe.routing import (
    Router,
    Routing,
    RoutingKind,
    TaskRouting,
    TopKRouting,
    check_task_ids,
    get_routing,
    per_token,
    register_routing,
    route,
    routed_tasks,
    routing_task_id,
    sort_by_expert,
    unregister_routing,
    warn_unseen_tasks,
)
from tests.helpers import tiny_llama


def logits(tokens=13, experts=6, seed=0, dtype=torch.float32):
    return torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_top_k_routing_keeps_the_k_most_probable_experts_with_renormalised_gates(k):
    x = logits()
    routing = route(x, top_k=k)
    probs = torch.softmax(x.double(), -1)
    assert torch.allclose(routing.probs.double(), probs, atol=1e-6)
    assert routing.indices.shape == (13, k) and routing.indices.dtype == torch.int64
    for t in range(13):
        ranked = sorted(range(6), key=lambda i: -float(probs[t, i]))[:k]
        assert sorted(routing.indices[t].tolist()) == sorted(ranked)
        chosen = probs[t, routing.indices[t]]
        assert torch.allclose(routing.gates[t].double(), chosen / chosen.sum(), atol=1e-6)
    assert torch.allclose(routing.gates.sum(-1), torch.ones(13))
    assert routing.num_experts == 6


def test_top_1_gate_is_one_when_renormalised_and_the_probability_otherwise():
    x = logits().requires_grad_(True)
    routing = route(x, top_k=1)
    assert torch.equal(routing.gates.detach(), torch.ones(13, 1))
    switch = route(x, top_k=1, normalize=False)  # the Switch Transformer's gate
    torch.testing.assert_close(switch.gates, switch.probs.gather(1, switch.indices))
    assert torch.equal(switch.indices, routing.indices)
    (routing.probs[:, 0].sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_soft_routing_is_the_softmax_over_every_expert():
    x = logits(seed=1)
    routing = route(x, top_k=2, soft=True)  # top_k is ignored
    assert torch.equal(routing.indices, torch.arange(6).expand(13, 6))
    assert torch.allclose(routing.gates, torch.softmax(x, -1)) and routing.gates is routing.probs
    assert torch.allclose(routing.dense_gates(), torch.softmax(x, -1))


def test_half_precision_logits_give_float32_probabilities():
    routing = route(logits(dtype=torch.bfloat16), top_k=2)
    assert routing.probs.dtype == torch.float32 and routing.gates.dtype == torch.float32
    assert torch.allclose(routing.probs, torch.softmax(logits(dtype=torch.bfloat16).float(), -1))


def test_dense_gates_scatter_each_active_gate_into_its_expert_column():
    routing = route(logits(seed=2), top_k=3)
    dense = routing.dense_gates()
    expected = torch.zeros(13, 6)
    for t in range(13):
        for slot in range(3):
            expected[t, routing.indices[t, slot]] = routing.gates[t, slot]
    assert torch.equal(dense, expected)
    assert torch.equal((dense > 0).sum(-1), torch.full((13,), 3))


def test_dense_gates_of_a_hand_made_routing():
    routing = Routing(
        probs=torch.zeros(2, 4),
        indices=torch.tensor([[3, 1], [0, 2]]),
        gates=torch.tensor([[0.7, 0.3], [0.6, 0.4]]),
    )
    assert torch.equal(routing.dense_gates(), torch.tensor([[0.0, 0.3, 0.0, 0.7], [0.6, 0.0, 0.4, 0.0]]))


@pytest.mark.parametrize(("tokens", "k", "n"), [(17, 2, 5), (1, 1, 3), (9, 3, 8), (0, 2, 4)])
def test_sort_by_expert_against_a_python_loop(tokens, k, n):
    g = torch.Generator().manual_seed(tokens + k)
    indices = (
        torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(tokens)])
        if tokens
        else torch.zeros(0, k, dtype=torch.long)
    )
    pairs = sort_by_expert(indices, n)
    # the (token, slot) pairs of each expert, in token order (a stable sort)
    expected = [
        (t, s, int(indices[t, s]))
        for e in range(n)
        for t in range(tokens)
        for s in range(k)
        if indices[t, s] == e
    ]
    assert pairs.order.tolist() == [t * k + s for t, s, _ in expected]
    assert pairs.tokens.tolist() == [t for t, _, _ in expected]
    assert pairs.experts.tolist() == [e for _, _, e in expected]
    counts = [sum(1 for _, _, e in expected if e == i) for i in range(n)]
    assert pairs.counts.tolist() == counts
    assert pairs.offsets.dtype == torch.int32
    assert pairs.offsets.tolist() == [sum(counts[: i + 1]) for i in range(n)]


def test_sort_by_expert_counts_unused_experts_as_empty_groups():
    pairs = sort_by_expert(torch.tensor([[4, 1], [1, 4], [4, 1]]), 6)
    assert pairs.counts.tolist() == [0, 3, 0, 0, 3, 0]
    assert pairs.offsets.tolist() == [0, 3, 3, 3, 6, 6]
    assert pairs.tokens.tolist() == [0, 1, 2, 0, 1, 2]


def test_router_is_a_bias_free_linear_of_the_input_features():
    torch.manual_seed(0)
    router = Router(in_features=10, num_experts=4)
    assert router.weight.shape == (4, 10) and router.bias is None
    x = torch.randn(3, 10)
    assert torch.allclose(router(x), x @ router.weight.t())


class FixedFirstExpert(RoutingKind):
    """A toy kind registered from this test alone: every token to expert 0 with gate 1, plus a learned
    per-expert bias on the logits (a router parameter beyond router.weight, saved under its own key)."""

    name = "first_toy"

    @classmethod
    def shapes(cls, num_experts, in_features):
        return {**super().shapes(num_experts, in_features), "router_bias": (num_experts,)}

    @classmethod
    def create(cls, layer, factory):
        super().create(layer, factory)
        layer.router_bias = torch.nn.Parameter(torch.zeros(layer.num_experts, **factory))

    @classmethod
    def route(cls, layer, x):
        logits = layer.router(x) + layer.router_bias
        probs = torch.softmax(logits.float(), -1)
        indices = torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)
        return logits, Routing(probs, indices, torch.ones(x.shape[0], 1, device=x.device))


@pytest.fixture
def first_toy():
    register_routing(FixedFirstExpert)
    yield FixedFirstExpert
    unregister_routing(FixedFirstExpert.name)


def test_a_routing_kind_registered_from_outside_routes_saves_and_loads(first_toy, tmp_path):
    torch.manual_seed(0)
    config = ComoeConfig.preset("moe", routing="first_toy", top_k=1, lora_dropout=0.0)
    model = get_comoe_model(tiny_llama(), config)
    layers = model.comoe_layers()
    for layer in layers.values():
        assert layer.routing_kind is first_toy and layer.active_experts == 1
        with torch.no_grad():
            layer.lora_B.normal_(std=0.1)
            layer.router_bias.normal_()
    ids = torch.randint(0, 100, (2, 7))
    with model.record_routing() as records:
        trained = model(ids).logits
    assert all(torch.equal(r.routing.indices, torch.zeros_like(r.routing.indices)) for r in records.values())
    # expert 0 alone: the layer is W0 x + s B_0 A_0 x
    layer = next(iter(layers.values()))
    x = torch.randn(5, layer.in_features)
    expected = layer.base_layer(x) + layer.scaling * (x @ layer.lora_A[0].t()) @ layer.lora_B[0]
    torch.testing.assert_close(layer(x), expected)
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {k for k in keys if k.endswith("router_bias")} and {k for k in keys if k.endswith("router.weight")}
    loaded = ComoeModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trained)


def test_unknown_routing_kinds_are_refused_listing_the_registered_ones():
    assert get_routing("topk") is TopKRouting and get_routing("soft").dense
    with pytest.raises(ValueError, match="routing='dense' is not a registered routing kind; valid: topk, soft"):
        get_comoe_model(tiny_llama(), ComoeConfig.preset("moe", routing="dense"))


# ---- routing 'task': MOELoRA's task-motivated gate (Liu et al. 2023) ---------------------------------------

TASKS = ["qa", "sum", "nli"]


def task_model(**overrides):
    torch.manual_seed(0)
    config = ComoeConfig.preset("moelora-liu", tasks=TASKS, lora_dropout=0.0, **overrides)
    model = get_comoe_model(tiny_llama(), config)
    for layer in model.comoe_layers().values():
        with torch.no_grad():
            layer.lora_B.normal_(std=0.1)
    return model


def test_per_token_spreads_each_sequence_value_over_its_tokens():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert per_token(values, 6).tolist() == [[1.0, 2.0]] * 3 + [[3.0, 4.0]] * 3
    assert per_token(torch.tensor([7]), 4).tolist() == [7, 7, 7, 7]  # one value for every row
    with pytest.raises(ValueError, match="per-sequence input of 2 rows cannot be spread over the 5 tokens"):
        per_token(values, 5)


def test_check_task_ids_keeps_integer_ids_of_the_tasks_and_refuses_the_rest():
    assert check_task_ids(torch.tensor([4, -1], dtype=torch.int32), 5, batch=2).tolist() == [4, -1]
    assert check_task_ids(torch.tensor([3]), 5, batch=4).tolist() == [3]  # one id for every row
    assert check_task_ids(2, 5).tolist() == [2] and check_task_ids([0, 1, 2], 5).dtype == torch.int64
    assert check_task_ids(torch.zeros(0, dtype=torch.long), 5, batch=0).shape == (0,)
    refused = {
        "got shape \\[2\\]": (torch.tensor([0, 1]), 3),
        "got shape \\[2, 1\\]": (torch.tensor([[0], [1]]), 2),
        "got shape \\[0\\]": (torch.zeros(0, dtype=torch.long), 2),
        "got dtype torch.float32": (torch.tensor([1.7]), 1),
        "got dtype torch.bool": (torch.tensor([True]), 1),
        "each in -1 .. 4 \\(-1: a task outside the 5\\)$": (torch.tensor([-2]), 1),
        "each in -1 .. 4": (torch.tensor([0, 9]), 2),
    }
    for reason, (ids, batch) in refused.items():
        with pytest.raises(ValueError, match=f"^task_ids=.* is invalid: expected integers of shape .*{reason}"):
            check_task_ids(ids, 5, batch=batch)


def test_the_task_gate_is_the_written_out_mixture_in_value_and_gradient():
    model = task_model()
    layer = model.comoe_layers()["model.layers.0.mlp.down_proj"]
    assert layer.routing_kind is TaskRouting and layer.active_experts == 8
    assert layer.task_embedding.weight.shape == (3, 64) and layer.router.weight.shape == (8, 64)
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    task_ids = torch.tensor([2, 0])
    model._context.call_inputs = {"task_ids": task_ids}
    got = layer(x)
    # plainly: one gate per example, softmax(W_T e_task), the same for each of its tokens
    expected = []
    for b in range(2):
        gate = torch.softmax(layer.router.weight @ layer.task_embedding.weight[task_ids[b]], dim=-1)
        rows = [layer.base_layer(x[b, t]) for t in range(5)]
        for t in range(5):
            for i in range(8):
                rows[t] = rows[t] + gate[i] * layer.scaling * (layer.lora_A[i] @ x[b, t]) @ layer.lora_B[i]
        expected.append(torch.stack(rows))
    expected = torch.stack(expected)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    params = [x, layer.task_embedding.weight, layer.router.weight, layer.lora_A, layer.lora_B]
    grads = torch.autograd.grad(got.square().sum(), params)
    want = torch.autograd.grad(expected.square().sum(), params)
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert grads[1][1].abs().sum() == 0 and grads[1][0].abs().sum() > 0  # only the tasks seen learn


def test_a_task_outside_the_vocabulary_gets_the_mean_of_the_known_tasks_gates():
    layer = next(iter(task_model().comoe_layers().values()))
    logits = TaskRouting.task_logits(layer, torch.tensor([-1, 1]))
    known = torch.softmax(layer.router(layer.task_embedding.weight), -1)
    torch.testing.assert_close(torch.softmax(logits[0], -1), known.mean(0))
    torch.testing.assert_close(torch.softmax(logits[1], -1), known[1])


def test_task_ids_travel_through_forward_and_generate_and_are_refused_when_missing():
    model = task_model()
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 1])).logits
        other = model(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([2, 1])).logits
        assert not torch.allclose(first[0], other[0]) and torch.allclose(first[1], other[1])
        with model.default_call_inputs(task_ids=[0]):  # one id for every row
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits[0], first[0])
        generated = model.generate(
            input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 1]), max_new_tokens=3, do_sample=False
        )
        # greedy decoding's first new token is the forward's argmax at the last position
        assert torch.equal(generated[:, 6], first[:, -1].argmax(-1))
        with pytest.raises(ValueError, match="task_ids: missing; this adapter \\(routing='task'"):
            model(input_ids=ids, attention_mask=mask)
        with model.disable_adapters():  # the base model needs no task ids
            model(input_ids=ids, attention_mask=mask)
        model(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="task_ids: missing"):  # a direct call reuses no earlier ids
            model.base_model(input_ids=ids, attention_mask=mask)
        with model.default_call_inputs(task_ids=[1]):
            model.base_model(input_ids=ids, attention_mask=mask)
    with (
        pytest.raises(ValueError, match="default_call_inputs: \\['prompt'\\] are not inputs"),
        model.default_call_inputs(prompt=[1]),
    ):
        pass


def test_kv_cached_generation_routes_each_row_by_its_own_task_on_every_step(monkeypatch):
    """Rows of three tasks in one generate call (left-padded, KV cache): the prompt step sees every row's
    tokens and each decode step one token per row, always with the call's [B] task ids, and each row's
    tokens equal a loop that runs the whole sequence through the model with that row's id alone."""
    model = task_model()
    with torch.no_grad():
        for layer in model.comoe_layers().values():
            layer.router.weight.normal_()  # gates that differ clearly between the tasks
    ids = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # row 1 is left-padded
    task_ids = torch.tensor([2, 0, 1])
    seen = []
    route_tokens = TaskRouting.route.__func__
    watched = model.comoe_layers()["model.layers.1.mlp.down_proj"]

    def spy(cls, layer, x):
        if layer is watched:
            seen.append((x.shape[0], layer.context.call_inputs["task_ids"].tolist()))
        return route_tokens(cls, layer, x)

    monkeypatch.setattr(TaskRouting, "route", classmethod(spy))
    with torch.no_grad():
        generated = model.generate(
            input_ids=ids, attention_mask=mask, task_ids=task_ids, max_new_tokens=5, do_sample=False, pad_token_id=0
        )
        assert seen == [(18, [2, 0, 1])] + [(3, [2, 0, 1])] * 4  # the prompt, then 4 cached steps
        others = model.generate(
            input_ids=ids, attention_mask=mask, task_ids=[0], max_new_tokens=5, do_sample=False, pad_token_id=0
        )
        assert not torch.equal(generated[0], others[0]) and torch.equal(generated[1], others[1])
        for row in range(3):
            sequence = ids[row : row + 1, 2 if row == 1 else 0 :]
            for _ in range(5):
                logits = model(input_ids=sequence, task_ids=task_ids[row : row + 1]).logits[0, -1]
                sequence = torch.cat([sequence, logits.argmax().view(1, 1)], dim=1)
            assert torch.equal(generated[row, 6:], sequence[0, -5:])


def test_a_task_name_maps_to_its_id_only_for_adapters_routed_by_task():
    routed = ComoeConfig.preset("moelora-liu", tasks=TASKS)
    assert routed_tasks(routed) == TASKS and routing_task_id(routed, "nli") == 2
    with pytest.raises(ValueError, match="^mine='x' is invalid: expected one of the adapter's tasks: 'qa', 'sum'"):
        routing_task_id(routed, "x", field="mine")
    loramoe = ComoeConfig.preset("loramoe", tasks=TASKS)
    assert routed_tasks(loramoe) is None and routed_tasks(None) is None and routed_tasks(ComoeConfig()) is None
    refused = {
        "this adapter's routing \\('soft'\\) reads no task \\(its task vocabulary is not read at": loramoe,
        "this adapter's routing \\('topk'\\) reads no task, so": ComoeConfig(),
        "the model has no comoe adapter, so": None,
    }
    for reason, config in refused.items():
        with pytest.raises(ValueError, match=f"^task='qa' is invalid: {reason}"):
            routing_task_id(config, "qa")


def test_other_methods_read_no_per_call_inputs():
    model = get_comoe_model(tiny_llama(), ComoeConfig.preset("comoe", r=4))
    assert model.call_input_names == frozenset()
    model(input_ids=torch.randint(0, 128, (2, 5)))
    assert model._context.call_inputs == {}


def test_a_task_routed_adapter_saves_its_vocabulary_and_loads_to_the_same_logits(tmp_path):
    model = task_model()
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for layer in model.comoe_layers().values():
            layer.task_embedding.weight.normal_()
        before = model(input_ids=ids, task_ids=torch.tensor([1, 2])).logits
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "model.layers.1.self_attn.q_proj.task_embedding.weight" in keys
    loaded = ComoeModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.comoe_config.tasks == TASKS and loaded.call_input_names == {"task_ids"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, task_ids=torch.tensor([1, 2])).logits, before)


def test_task_routing_needs_a_task_vocabulary():
    with pytest.raises(ValueError, match="tasks: null; routing='task' needs the task vocabulary"):
        get_comoe_model(tiny_llama(), ComoeConfig.preset("moelora-liu"))


def test_tasks_outside_the_vocabulary_are_warned_of_once_only_where_routing_reads_them(caplog):
    """warn_unseen_tasks: the unseen names in order of first appearance, in one warning; nothing for a
    routing that reads no task ids (loramoe's tasks, soft routing) or a model without an adapter."""
    routed = ComoeConfig.preset("moelora-liu", tasks=["a", "b"])
    with caplog.at_level("WARNING", logger="comoe"):
        assert warn_unseen_tasks(routed, ["d", "a", "c", "d"], "prompts") == ["d", "c"]
        assert warn_unseen_tasks(routed, ["a", "b"]) == []
        assert warn_unseen_tasks(ComoeConfig.preset("loramoe", tasks=["a"]), ["c"]) == []
        assert warn_unseen_tasks(None, ["c"]) == []
    (record,) = caplog.records
    assert record.getMessage().startswith(
        "tasks ['d', 'c'] are not among the adapter's training tasks ['a', 'b']: their prompts are routed with "
        "the mean of the known tasks' gates"
    )
