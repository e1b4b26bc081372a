"""Token masks per token stream, bound from the wrapped forward's signature: the auxiliary losses of a
padded batch equal those of the same rows run one at a time without padding -- with the mask passed by
keyword or by position, with a KV cache, and for GPT-2 and T5 (encoder and decoder streams of different
and of equal lengths)."""

import dataclasses

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

from comoe import ComoeConfig, get_comoe_model
from comoe.adapter.streams import (
    DECODER,
    ENCODER,
    TokenMasks,
    bound_arguments,
    cached_length,
    layer_streams,
    prompt_inputs,
)
from comoe.moe.prompt import PROMPT_CACHED, PROMPT_MASK
from comoe.moe.routing import Routing
from comoe.objectives.auxiliary import compute_auxiliary_losses
from tests.helpers import tiny_llama

CONFIG = dict(lora_dropout=0.0, balance_weight=0.01, r=4)  # CoMoE contrastive + balance


def adapted(base, **fields):
    torch.manual_seed(1)
    model = get_comoe_model(base, ComoeConfig.preset("comoe", **{**CONFIG, **fields}))
    with torch.no_grad():
        for layer in model.comoe_layers().values():
            layer.lora_B.normal_(0, 0.3)
            layer.router.weight.normal_(0, 1.0)  # routing that differs from token to token
    return model.eval()


def concatenated(parts):
    """One layer's records of several calls as one record over all their tokens."""
    first = parts[0]
    routing = Routing(
        *(torch.cat([getattr(p.routing, f) for p in parts]) for f in ("probs", "indices", "gates"))
    )
    norms = None if first.base_norm is None else torch.cat([p.base_norm.reshape(-1) for p in parts])
    return dataclasses.replace(
        first, routing=routing, z=torch.cat([p.z for p in parts]), mask=None, base_norm=norms
    )


def reference(model, calls, last=None):
    """Balance and contrastive over the real tokens: each call (one unpadded row) run alone, the layers'
    records concatenated; `last[i]`: keep only row i's last tokens (those a cached call would see)."""
    per_layer = {}
    with torch.no_grad(), model.record_routing() as records:
        for index, kwargs in enumerate(calls):
            model(**kwargs)
            for name, record in records.items():
                if last is not None:
                    keep = slice(record.z.shape[0] - last[index], None)
                    routing = Routing(
                        record.routing.probs[keep], record.routing.indices[keep], record.routing.gates[keep]
                    )
                    norms = None if record.base_norm is None else record.base_norm.reshape(-1)[keep]
                    record = dataclasses.replace(record, routing=routing, z=record.z[keep], base_norm=norms)
                per_layer.setdefault(name, []).append(record)
    losses = compute_auxiliary_losses(
        [concatenated(parts) for parts in per_layer.values()], model.comoe_config
    )
    return {name: float(value) for name, value in losses.values.items()}


def padded(rows, length, pad=0):
    ids = torch.full((len(rows), length), pad)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    return ids, mask


def assert_losses(model, expected):
    got = model.last_aux_losses()
    for name in ("balance", "contrastive"):
        assert got[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), name


def rows_of(lengths, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("positional", [False, True])
def test_llama_mask_by_keyword_or_position(positional):
    model = adapted(tiny_llama())
    rows = rows_of([10, 4])
    ids, mask = padded(rows, 10)
    labels = ids.masked_fill(mask == 0, -100)
    expected = reference(model, [dict(input_ids=row.unsqueeze(0)) for row in rows])
    with torch.no_grad():
        if positional:
            model(ids, mask, labels=labels)
        else:
            model(input_ids=ids, attention_mask=mask, labels=labels)
    assert_losses(model, expected)
    with torch.no_grad():  # without the mask the padding counts, and the values differ
        model(input_ids=ids, labels=labels)
    assert model.last_aux_losses()["balance"] != pytest.approx(expected["balance"], rel=1e-4)


def test_llama_with_a_kv_cache_counts_the_new_real_tokens():
    model = adapted(tiny_llama())
    prefix = rows_of([5], seed=3)[0]
    continuations = rows_of([4, 2], seed=4)
    cont, cont_mask = padded(continuations, 4)
    full_mask = torch.cat([torch.ones(2, 5, dtype=torch.long), cont_mask], dim=1)
    expected = reference(
        model,
        [dict(input_ids=torch.cat([prefix, row]).unsqueeze(0)) for row in continuations],
        last=[len(row) for row in continuations],
    )
    with torch.no_grad():
        cache = model(input_ids=prefix.expand(2, -1), use_cache=True).past_key_values
        model(
            input_ids=cont,
            attention_mask=full_mask,
            past_key_values=cache,
            labels=cont.masked_fill(cont_mask == 0, -100),
        )
    assert_losses(model, expected)


def test_gpt2_conv1d_layers_count_real_tokens():
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=64)).eval()
    model = adapted(base)
    rows = rows_of([8, 3])
    ids, mask = padded(rows, 8)
    expected = reference(model, [dict(input_ids=row.unsqueeze(0)) for row in rows])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    assert_losses(model, expected)


def tiny_t5():
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=128,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return T5ForConditionalGeneration(config).eval()


def test_t5_layers_are_told_their_stream():
    model = adapted(tiny_t5())
    streams = {name: layer.stream for name, layer in model.comoe_layers().items()}
    assert streams["encoder.block.0.layer.0.SelfAttention.q"] == ENCODER
    assert streams["decoder.block.0.layer.0.SelfAttention.q"] == DECODER
    assert streams["decoder.block.0.layer.1.EncDecAttention.q"] == DECODER
    assert streams["decoder.block.0.layer.1.EncDecAttention.v"] == ENCODER  # projects encoder states
    assert layer_streams(tiny_llama(), ["model.layers.0.self_attn.q_proj"]) == {
        "model.layers.0.self_attn.q_proj": DECODER
    }


@pytest.mark.parametrize(("encoder_lengths", "decoder_lengths"), [([9, 4], [5, 2]), ([6, 3], [6, 2])])
def test_t5_encoder_and_decoder_masks(encoder_lengths, decoder_lengths):
    model = adapted(tiny_t5())
    sources, targets = rows_of(encoder_lengths, seed=5), rows_of(decoder_lengths, seed=6)
    ids, mask = padded(sources, max(encoder_lengths))
    decoder_ids, decoder_mask = padded(targets, max(decoder_lengths))
    expected = reference(
        model,
        [
            dict(input_ids=s.unsqueeze(0), decoder_input_ids=t.unsqueeze(0))
            for s, t in zip(sources, targets, strict=True)
        ],
    )
    with torch.no_grad():
        model(
            input_ids=ids,
            attention_mask=mask,
            decoder_input_ids=decoder_ids,
            decoder_attention_mask=decoder_mask,
            labels=decoder_ids.masked_fill(decoder_mask == 0, -100),
        )
    assert_losses(model, expected)


def test_bound_arguments_and_masks_for_a_layer():
    def forward(input_ids=None, attention_mask=None, labels=None, **kwargs):
        return None

    bound = bound_arguments(forward, ("ids", "mask"), {"num_items_in_batch": 3})
    assert bound == {"input_ids": "ids", "attention_mask": "mask", "num_items_in_batch": 3}
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    masks = TokenMasks.bind({"attention_mask": mask}, encoder_decoder=False)
    assert masks.for_layer(DECODER, 8).tolist() == [True, True, True, False, True, True, False, False]
    assert masks.for_layer(DECODER, 4).tolist() == [True, False, False, False]  # a cache: the last 2 columns
    assert masks.for_layer(ENCODER, 6) is None  # no such stream: every token real
    with pytest.raises(ValueError, match="q_proj \\(decoder tokens\\) saw 7 tokens.*shape \\(2, 4\\)"):
        masks.for_layer(DECODER, 7, "q_proj")
    with pytest.raises(ValueError, match="saw 10 tokens"):
        masks.for_layer(DECODER, 10, "q_proj")
    four_d = TokenMasks.bind({"attention_mask": torch.zeros(2, 1, 4, 4)}, encoder_decoder=False)
    assert four_d.for_layer(DECODER, 8) is None


def test_prompt_inputs_mark_the_real_unlabelled_tokens_or_a_continued_cache():
    ids = torch.ones(2, 4, dtype=torch.long)
    attention = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, 5, 6], [7, 8, 9, -100]])  # row 1 labels every real token
    mask = prompt_inputs({"input_ids": ids, "attention_mask": attention, "labels": labels})[PROMPT_MASK]
    assert mask.tolist() == [[False, True, False, False], [True, True, True, False]]  # row 1: its real tokens
    plain = prompt_inputs({"input_ids": ids, "attention_mask": attention})
    assert plain[PROMPT_MASK].tolist() == attention.bool().tolist() and PROMPT_CACHED not in plain
    given = prompt_inputs({"input_ids": ids, "labels": labels}, torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0]]))
    assert given[PROMPT_MASK].tolist() == [[True, False, False, False], [False, True, False, False]]
    with pytest.raises(ValueError, match="prompt_mask: shape \\(2, 3\\)"):
        prompt_inputs({"input_ids": ids}, torch.ones(2, 3))
    cache = DynamicCache()
    cache.update(torch.zeros(2, 1, 5, 4), torch.zeros(2, 1, 5, 4), 0)
    step = prompt_inputs({"input_ids": ids[:, :1], "cache": cache})
    assert cached_length({"cache": cache}) == 5 and PROMPT_CACHED in step
    assert step[PROMPT_MASK].shape == (2, 1) and not step[PROMPT_MASK].any()
    assert prompt_inputs({"attention_mask": attention}) == {}
