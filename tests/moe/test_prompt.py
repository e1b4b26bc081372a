"""MiLoRA's prompt-aware routing: the layer against a plain per-sequence reference (values and gradients),
decode steps reusing the prompt's decision, padding on either side leaving the decision unchanged, greedy
generation with a KV cache against a no-cache forward whose labels mark the prompt, training with labels
pooling over the prompt alone (also through comoe's training loss, which passes no labels), the preset
saved and loaded."""

import pytest
import torch
from torch import nn

from comoe import ComoeConfig, ComoeModel, get_comoe_model
from comoe.adapter.layer import ComoeContext, ComoeLinear
from comoe.data.collate import IGNORE_INDEX
from comoe.models.head import response_logits
from comoe.moe.prompt import PROMPT_CACHED, PROMPT_MASK, PromptRouting, pool_prompt
from comoe.moe.routing import get_routing
from tests.helpers import tiny_llama


def prompt_layer(seed=0):
    torch.manual_seed(seed)
    config = ComoeConfig(num_experts=5, top_k=2, r=3, lora_alpha=6.0, lora_dropout=0.0, routing="prompt")
    layer = ComoeLinear(nn.Linear(10, 7), config, ComoeContext())
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
        layer.router.weight.normal_(std=1.0)
    return layer


def reference(layer, x, mask, decisions=None):
    """Each sequence b: m = mean of x[b] over its prompt tokens, p = softmax(W_g m), its top-2 experts with
    renormalised gates, applied to every token of the sequence (`decisions` given: those (experts, gates))."""
    rows = []
    chosen = []
    for b in range(x.shape[0]):
        if decisions is None:
            pooled = x[b][mask[b]].mean(0)
            probs = torch.softmax(layer.router.weight @ pooled, dim=0)
            top, experts = probs.topk(2)
            gates = top / top.sum()
        else:
            experts, gates = decisions[b]
        chosen.append((experts, gates))
        out = layer.base_layer(x[b])
        for gate, i in zip(gates, experts, strict=True):
            out = out + gate * layer.scaling * (x[b] @ layer.lora_A[i].t()) @ layer.lora_B[i]
        rows.append(out)
    return torch.stack(rows), chosen


def prompt_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 6, 10, generator=g, requires_grad=True)
    mask = torch.tensor(
        [[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0]], dtype=torch.bool
    )  # a prompt at the start, one after left padding, scattered tokens
    return x, mask


def test_the_layer_routes_each_sequence_by_its_pooled_prompt_in_values_and_gradients():
    layer = prompt_layer()
    assert layer.routing_kind is PromptRouting and get_routing("prompt") is PromptRouting
    x, mask = prompt_batch()
    layer.context.call_inputs = {PROMPT_MASK: mask}
    weights = torch.randn(3, 6, 7, generator=torch.Generator().manual_seed(2))
    params = [x, layer.router.weight, layer.lora_A, layer.lora_B]
    fast = layer(x)
    fast_grads = torch.autograd.grad((fast * weights).sum(), params)
    slow, _ = reference(layer, x, mask)
    slow_grads = torch.autograd.grad((slow * weights).sum(), params)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    for a, b in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        assert a.abs().sum() > 0
    torch.testing.assert_close(pool_prompt(x.reshape(18, 10), mask)[1], x[1, 2:].mean(0))


def test_decode_steps_reuse_the_prompts_decision_and_refuse_without_one():
    layer = prompt_layer()
    x, mask = prompt_batch()
    with pytest.raises(ValueError, match="holds no prompt decision"):
        layer.context.call_inputs = {
            PROMPT_MASK: torch.zeros(3, 1, dtype=torch.bool),
            PROMPT_CACHED: torch.ones(1),
        }
        layer(torch.randn(3, 1, 10))
    layer.context.call_inputs = {PROMPT_MASK: mask}
    with torch.no_grad():
        _, chosen = reference(layer, x, mask)
        layer(x)
        step = torch.randn(3, 2, 10)  # two new tokens per sequence, none of them prompt
        layer.context.call_inputs = {
            PROMPT_MASK: torch.zeros(3, 2, dtype=torch.bool),
            PROMPT_CACHED: torch.ones(1),
        }
        expected, _ = reference(layer, step, None, chosen)
        torch.testing.assert_close(layer(step), expected)
        layer.context.call_inputs[PROMPT_MASK] = torch.zeros(6, 1, dtype=torch.bool)  # a repeated cache
        with pytest.raises(ValueError, match="a decode step of 6 sequences continues a prompt of 3"):
            layer(torch.randn(6, 1, 10))
        PromptRouting.reset(layer)
        assert layer.prompt_decision is None


def milora_model(seed=0):
    torch.manual_seed(seed)
    model = get_comoe_model(tiny_llama(seed=seed), ComoeConfig.preset("milora", lora_dropout=0.0))
    for layer in model.comoe_layers().values():
        with torch.no_grad():
            layer.lora_B.normal_(std=0.2)
            layer.router.weight.normal_(std=1.0)
    return model.eval()


def decisions(records):
    return {
        name: (r.routing.indices.clone(), r.routing.gates.detach().clone()) for name, r in records.items()
    }


def test_padding_on_either_side_leaves_each_sequences_decision_and_logits_unchanged():
    model = milora_model()
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(1, 128, (n,), generator=g) for n in (7, 4)]
    alone = []
    for seq in seqs:
        with torch.no_grad(), model.record_routing() as records:
            logits = model(input_ids=seq[None]).logits[0]
        alone.append((logits, decisions(records)))
    for side in ("left", "right"):
        ids = torch.zeros(2, 7, dtype=torch.long)
        mask = torch.zeros(2, 7, dtype=torch.long)
        for row, seq in enumerate(seqs):
            span = slice(7 - len(seq), 7) if side == "left" else slice(0, len(seq))
            ids[row, span], mask[row, span] = seq, 1
        with torch.no_grad(), model.record_routing() as records:
            logits = model(input_ids=ids, attention_mask=mask).logits
        batched = decisions(records)
        for row, seq in enumerate(seqs):
            span = slice(7 - len(seq), 7) if side == "left" else slice(0, len(seq))
            torch.testing.assert_close(logits[row, span], alone[row][0], atol=1e-4, rtol=1e-4)
            for name, (indices, gates) in alone[row][1].items():
                row_indices = batched[name][0].view(2, 7, -1)[row]
                assert torch.equal(row_indices, indices[:1].expand(7, -1)), (side, name)
                torch.testing.assert_close(batched[name][1].view(2, 7, -1)[row, 0], gates[0])


def test_greedy_generation_with_a_cache_equals_a_no_cache_forward_pooling_the_prompt():
    model = milora_model()
    prompt = torch.tensor([[0, 0, 5, 17, 33, 9], [21, 4, 8, 60, 2, 11]])
    attention = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    out = model.generate(
        input_ids=prompt,
        attention_mask=attention,
        max_new_tokens=6,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    assert all(layer.prompt_decision is None for layer in model.comoe_layers().values())  # reset after
    full = out.sequences
    labels = full.clone()
    labels[:, :6] = IGNORE_INDEX  # the prompt: what the prefill pooled
    mask = torch.cat([attention, torch.ones(2, 6, dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=mask, labels=labels).logits
    torch.testing.assert_close(torch.stack(out.scores, 1), logits[:, 5:-1], atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # pooling over every token instead changes the output: the test can fail
        everything = model(input_ids=full, attention_mask=mask).logits
    assert not torch.allclose(everything[:, 5:-1], logits[:, 5:-1], atol=1e-3)


def test_training_with_labels_pools_over_the_prompt_tokens_only():
    model = milora_model().train()
    prompt = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(4))
    runs = []
    for seed in (5, 6):  # the same prompts, other responses
        response = torch.randint(1, 128, (2, 4), generator=torch.Generator().manual_seed(seed))
        ids = torch.cat([prompt, response], dim=1)
        labels = ids.clone()
        labels[:, :5] = IGNORE_INDEX
        with model.record_routing() as records:
            model(input_ids=ids, labels=labels).loss.backward()
        runs.append(decisions(records))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        with model.record_routing() as records, model.caller_adds_aux_loss():  # comoe's loss: no labels
            response_logits(model, batch)
        assert decisions(records).keys() == runs[-1].keys()
        for name, (indices, gates) in decisions(records).items():
            assert torch.equal(indices, runs[-1][name][0])
            torch.testing.assert_close(gates, runs[-1][name][1])
    for name, (indices, gates) in runs[0].items():
        assert torch.equal(indices, runs[1][name][0]), name
        torch.testing.assert_close(gates, runs[1][name][1])
    with model.record_routing() as records:  # without labels every real token is pooled: other gates
        model(input_ids=ids)
    assert any(not torch.allclose(r.routing.gates, runs[1][n][1]) for n, r in records.items())


def test_the_milora_preset_saves_and_loads(tmp_path):
    config = ComoeConfig.preset("milora")
    assert (config.num_experts, config.top_k, config.r, config.lora_alpha) == (4, 2, 16, 32.0)
    assert (config.routing, config.active_experts, config.objective_weights) == ("prompt", 2, {})
    model = milora_model()
    assert model.reads_prompt
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = ComoeModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.comoe_config == model.comoe_config and loaded.reads_prompt
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits)
