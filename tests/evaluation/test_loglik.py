"""The prompt-cached option scoring against the plain per-option path, on the model families whose
caches and heads differ: Llama, Gemma 3 (sliding-window layers), Gemma 2 (logit soft-capping), and a
comoe-adapted model (routing per token must not depend on the cache)."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    T5Config,
)

from comoe.adapter.model import get_comoe_model
from comoe.config import ComoeConfig
from comoe.evaluation.generation import task_routing
from comoe.evaluation.loglik import (
    context_length,
    option_loglikelihoods,
    plain_scores,
    sliding_window,
    tokenize_question,
    within_context,
)
from tests.helpers import TINY_SIZES, questions, task_routed, tiny_llama


def tiny_gemma3(vocab: int, window: int) -> Gemma3ForCausalLM:
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        **{**TINY_SIZES, "vocab_size": vocab, "num_hidden_layers": 3, "num_key_value_heads": 1},
        head_dim=16,
        sliding_window=window,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )
    return Gemma3ForCausalLM(config).eval()


def tiny_gemma2(vocab: int) -> Gemma2ForCausalLM:
    torch.manual_seed(0)
    config = Gemma2Config(
        **{**TINY_SIZES, "vocab_size": vocab},
        head_dim=16,
        final_logit_softcapping=0.5,  # small, so capping changes every score
    )
    return Gemma2ForCausalLM(config).eval()


def adapted_llama(vocab: int):
    model = get_comoe_model(tiny_llama(vocab=vocab), ComoeConfig.preset("comoe", lora_dropout=0.0))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "router" in name:
                parameter.normal_(0, 0.3)  # experts that change the output, routers that differ per token
    return model.eval()


MODELS = {
    "llama": lambda vocab: tiny_llama(vocab=vocab),
    "gemma3": lambda vocab: tiny_gemma3(vocab, window=96),
    "gemma2": tiny_gemma2,
    "comoe-llama": adapted_llama,
}


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_cached_scores_equal_the_plain_path(smol_tokenizer, family, batch_size):
    model = MODELS[family](len(smol_tokenizer))
    examples = questions(12)
    cached, cut = option_loglikelihoods(model, smol_tokenizer, examples, batch_size)
    plain, plain_cut = plain_scores(model, smol_tokenizer, examples, 4, window=256)
    assert cut == plain_cut == [False] * len(examples)
    for got, want, example in zip(cached, plain, examples, strict=True):
        assert len(got) == len(want) == example.instruction.count("answer")
        assert got == pytest.approx(want, abs=2e-4)
        assert max(got) < 0  # a real log-probability, not a zero left by a skipped option


def test_gemma2_scores_include_the_logit_soft_cap(smol_tokenizer):
    """With a cap of 0.5 every logit lies in (-0.5, 0.5), so an option of ~9 tokens scores near
    9 * -log(vocab); uncapped logits of the same model score far lower."""
    model = tiny_gemma2(len(smol_tokenizer))
    scores, _ = option_loglikelihoods(model, smol_tokenizer, questions(3), 8)
    uniform = torch.log(torch.tensor(float(len(smol_tokenizer))))
    for question in scores:
        for score in question:
            assert -11 * (uniform + 1.0) < score < -7 * (uniform - 1.0)


def test_questions_longer_than_the_sliding_window_take_the_plain_path(smol_tokenizer, monkeypatch):
    model = tiny_gemma3(len(smol_tokenizer), window=80)
    assert sliding_window(model) == 80
    examples = questions(12)
    seen: list[int] = []
    real = plain_scores

    def counting(model, tokenizer, chosen, batch_size, window):
        seen.extend(len(e.instruction) for e in chosen)
        return real(model, tokenizer, chosen, batch_size, window)

    monkeypatch.setattr("comoe.evaluation.loglik.plain_scores", counting)
    option_loglikelihoods(model, smol_tokenizer, examples, 8)
    # prompts of 53-87 tokens, responses of ~8: both paths are taken
    long = []
    for index, example in enumerate(examples):
        question = tokenize_question(smol_tokenizer, example, index)
        if len(question.prompt) + max(map(len, question.responses)) > 80:
            long.append(len(example.instruction))
    assert 0 < len(long) < len(examples) and sorted(seen) == sorted(long)


def test_prompt_cache_off_is_the_plain_path(smol_tokenizer):
    model = tiny_llama(vocab=len(smol_tokenizer))
    examples = questions(5)
    off, _ = option_loglikelihoods(model, smol_tokenizer, examples, 4, prompt_cache=False)
    plain, _ = plain_scores(model, smol_tokenizer, examples, 4, window=128)
    assert off == plain


def test_prompt_routed_adapters_are_scored_on_the_plain_path(smol_tokenizer):
    """MiLoRA's routing decides per prompt row; a prompt cache repeated once per option has no such rows
    (a decode step refuses it), so such adapters are scored per option, the prompt pooled alone."""
    torch.manual_seed(0)
    model = get_comoe_model(
        tiny_llama(vocab=len(smol_tokenizer)), ComoeConfig.preset("milora", lora_dropout=0.0)
    )
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "router" in name:
                parameter.normal_(0, 0.3)
    model.eval()
    examples = questions(5)
    scores, _ = option_loglikelihoods(model, smol_tokenizer, examples, 4)
    plain, _ = plain_scores(model, smol_tokenizer, examples, 4, window=128)
    assert scores == plain


def test_the_context_is_read_from_the_config_of_each_family_and_cuts_the_cutoff():
    """One lookup for evaluation, generation, training and analysis: max_position_embeddings (GPT-2's
    n_positions, a multimodal model's text_config), else the caller's default."""
    gpt2 = GPT2LMHeadModel(GPT2Config(n_positions=32, n_embd=16, n_layer=1, n_head=2, vocab_size=64))
    assert context_length(gpt2) == 32 and within_context(gpt2, 256) == 32 and within_context(gpt2, 16) == 16
    llama = tiny_llama()  # max_position_embeddings=128
    assert (
        context_length(llama) == 128 and within_context(llama, 256) == 128 and within_context(llama, 96) == 96
    )
    multimodal = SimpleNamespace(
        config=SimpleNamespace(text_config=SimpleNamespace(max_position_embeddings=64))
    )
    assert within_context(multimodal, 256) == 64
    relative = SimpleNamespace(config=T5Config())  # relative positions: the config names no context
    assert context_length(relative) == 2048 and within_context(relative, 256) == 256
    assert within_context(SimpleNamespace(), 300) == 300  # no config at all


def test_a_task_routed_adapter_without_a_task_is_refused_naming_this_entrys_remedy(smol_tokenizer):
    """option_loglikelihoods takes no task: its error says how to set one (task_routing), not a keyword it
    does not have; inside task_routing it scores."""
    routed = task_routed(tiny_llama(vocab=len(smol_tokenizer)))
    items = questions(1)
    with pytest.raises(ValueError, match=r"^task: missing; .*inside comoe\.evaluation\.generation\.task_routing"):
        option_loglikelihoods(routed, smol_tokenizer, items, 1)
    with task_routing(routed, "b"):
        (scores,), _ = option_loglikelihoods(routed, smol_tokenizer, items, 1)
    assert all(math.isfinite(score) for score in scores)
