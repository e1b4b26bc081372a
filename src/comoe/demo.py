"""The demo: wrap SmolLM2-135M with CoMoE experts, train briefly on real multi-task examples, save,
reload, check the reload is exact, and compare answers before and after."""

from __future__ import annotations

import os
import random
import time

import torch

from comoe.config import ComoeConfig
from comoe.data import builtin_examples
from comoe.model import ComoeModel, get_comoe_model
from comoe.models import load_base
from comoe.prompts import format_prompt, pad_batch, tokenize_example


def run_demo(
    output: str = "runs/demo", steps: int = 40, batch_size: int = 8, lr: float = 1e-3, seed: int = 0
) -> None:
    torch.manual_seed(seed)
    model, tokenizer = load_base("smollm2-135m")
    comoe = get_comoe_model(model, ComoeConfig.preset("comoe"))
    comoe.print_trainable_parameters()

    train = builtin_examples("train", per_task=16)
    tokenized = [
        tokenize_example(tokenizer, format_prompt(e.instruction, e.input), e.output, 256) for e in train
    ]
    optimizer = torch.optim.AdamW([p for p in comoe.parameters() if p.requires_grad], lr=lr)
    order = random.Random(seed)
    comoe.train()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        batch = pad_batch(order.sample(tokenized, batch_size), tokenizer.pad_token_id)
        loss = comoe(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step % 5 == 0:
            parts = comoe.last_aux_losses()
            print(
                f"step {step:3d}  loss {loss.item():.4f}  task {parts['task']:.4f}  "
                f"contrastive {parts['contrastive']:.4f}  ({time.perf_counter() - start:.0f} s)"
            )
    comoe.eval()

    adapter_dir = os.path.join(output, "adapter")
    comoe.save_pretrained(adapter_dir)
    reloaded = ComoeModel.from_pretrained(load_base("smollm2-135m")[0], adapter_dir)
    probe = pad_batch(tokenized[:4], tokenizer.pad_token_id)
    probe.pop("labels")
    with torch.no_grad():
        same = torch.equal(comoe(**probe).logits, reloaded(**probe).logits)
    print(f"saved {adapter_dir}; reloaded adapter gives identical logits: {same}")

    print("\nanswers on unseen test questions (base -> fine-tuned):")
    for example in builtin_examples("test", per_task=1):
        prompt = tokenizer(format_prompt(example.instruction, example.input), return_tensors="pt")
        with reloaded.disable_adapters():
            base = _greedy(reloaded, tokenizer, prompt)
        tuned = _greedy(reloaded, tokenizer, prompt)
        print(f"[{example.task}] gold {example.answer!r}: {base!r} -> {tuned!r}")


def _greedy(model: ComoeModel, tokenizer, prompt: dict[str, torch.Tensor], max_new_tokens: int = 16) -> str:
    with torch.no_grad():
        out = model.generate(
            **prompt, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True).strip()
