"""Serving throughput: vLLM with a comoe adapter against vLLM with the base model alone, vLLM with a plain
LoRA of the same active rank (top_k * r; vLLM's own multi-LoRA path) and comoe's own transformers
`generate`, on the same prompts, at batch 1 and 16, greedy, every prompt generating --max-tokens tokens.

    python benchmarks/bench_serve.py --json benchmarks/results/serve.json

The vLLM engines run in the serving environment (`make serve-setup`), one after another, each bound to one
core (VLLM_CPU_OMP_THREADS_BIND=0); comoe's generate runs here with one thread too. Adapter weights are
drawn at random (speed does not depend on their values). Targets (docs/serving.md): comoe >= 0.8x the plain
LoRA, and >= 1.5x comoe's generate at batch 16.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import benchmark_parser, save_results
from peft import LoraConfig, get_peft_model

from comoe.adapter.model import get_comoe_model
from comoe.config import ComoeConfig
from comoe.models.gguf import alias_cache, cache_root
from comoe.models.loading import load_base
from comoe.serving.server import serving_python

ENGINE_ENV = {
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "0",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine in the runner's process: one start less per job
}


def prompts(tokenizer, count: int) -> list[list[int]]:
    texts = [
        f"Question {i}: what is {i} plus {2 * i + 1}? Think step by step, then answer." for i in range(count)
    ]
    return [tokenizer(text)["input_ids"] for text in texts]


def randomised(model, seed: int = 0):
    """Every up-projection and router drawn at random (a zero B would still be computed: same speed)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "router" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    return model


def comoe_generate_rate(model, ids: list[list[int]], max_tokens: int, repeats: int) -> float:
    """Tokens/s of comoe's transformers generate over `ids` in one left-padded batch."""
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[0] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    rates = []
    for _ in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        rates.append(len(ids) * max_tokens / (time.perf_counter() - start))
    return max(rates[1:])


def main() -> None:
    parser = benchmark_parser(__doc__, "8 tokens per prompt, one timed run")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--preset", default="comoe")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="vLLM with torch.compile (default: eager)")
    args = parser.parse_args()
    if args.quick:
        args.max_tokens, args.repeats = 8, 1
    torch.set_num_threads(1)
    batches = [1, 16]
    folder = str(alias_cache(args.model, cache_root(None)) if not Path(args.model).is_dir() else args.model)
    base, tokenizer = load_base(folder)
    ids = prompts(tokenizer, max(batches))
    config = ComoeConfig.preset(args.preset)
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    comoe = randomised(get_comoe_model(base, config).eval())
    comoe.save_pretrained(work / "comoe")
    rank = config.active_experts * config.r  # the plain LoRA's rank: what one token runs through
    generate = {str(b): comoe_generate_rate(comoe, ids[:b], args.max_tokens, args.repeats) for b in batches}
    del comoe
    lora = randomised(
        get_peft_model(
            load_base(folder)[0],
            LoraConfig(
                r=rank,
                lora_alpha=config.scaling * rank,
                target_modules=list(config.target_modules),
                lora_dropout=0.0,
            ),
        )
    )
    lora.save_pretrained(work / "lora")
    del lora
    job = dict(
        model=folder,
        prompts=ids,
        max_tokens=args.max_tokens,
        repeats=args.repeats,
        batches=batches,
        enforce_eager=not args.compile,
        env=ENGINE_ENV,
    )
    jobs = {
        "base": dict(job),
        "comoe": dict(job, adapter=str(work / "comoe")),
        "lora": dict(job, lora=str(work / "lora")),
    }
    (work / "jobs.json").write_text(json.dumps(list(jobs.values())))
    run = subprocess.run(
        [serving_python(None), "-m", "comoe_vllm.offline", str(work / "jobs.json"), str(work / "out.json")],
        capture_output=True,
        text=True,
    )
    if run.returncode:
        sys.exit(run.stdout[-2000:] + run.stderr[-4000:])
    served = dict(zip(jobs, json.loads((work / "out.json").read_text()), strict=True))
    rates = {f"vllm-{name}": result["tokens_per_s"] for name, result in served.items()}
    rates["comoe-generate"] = generate
    ratios = {
        str(b): {
            "comoe/base": rates["vllm-comoe"][str(b)] / rates["vllm-base"][str(b)],
            "comoe/lora": rates["vllm-comoe"][str(b)] / rates["vllm-lora"][str(b)],
            "comoe/generate": rates["vllm-comoe"][str(b)] / rates["comoe-generate"][str(b)],
        }
        for b in batches
    }
    for b in batches:
        row = "  ".join(f"{name} {rates[name][str(b)]:7.1f}" for name in rates)
        print(f"batch {b:2d} tokens/s: {row}")
        print("          ratios: " + "  ".join(f"{k} {v:.2f}x" for k, v in ratios[str(b)].items()))
    save_results(
        args.json,
        {
            "model": args.model,
            "preset": args.preset,
            "lora_rank": rank,
            "max_tokens": args.max_tokens,
            "repeats": args.repeats,
            "compile": args.compile,
            "tokens_per_s": rates,
            "ratios": ratios,
            "targets": {"comoe/lora": 0.8, "comoe/generate at batch 16": 1.5},
        },
    )


if __name__ == "__main__":
    main()
