"""Offline runs of vLLM with or without a comoe adapter, for the parity tests and the benchmark:

    python -m comoe_vllm.offline JOBS.json OUT.json

JOBS.json is a list of jobs, each {"model": base folder, "adapter": comoe folder or null, "lora": PEFT LoRA
folder or null, "prompts": [[token ids], ...], "max_tokens": N, "logprobs": K, "dtype": "float32",
"tensor_parallel_size": 1, "enforce_eager": true, "repeats": 0, "copy": [from, to] or absent (a folder
copied over another before the job: a changed adapter at the same path), "env": {name: value} (set for
this job's engine, e.g. VLLM_CPU_OMP_THREADS_BIND)}; OUT.json gets, per job, the greedy tokens
and, per generated token, the top-K log-probabilities {token: logprob} (vLLM's raw log-softmax of the
logits), and, with repeats > 0, for each batch size in "batches" (default: all prompts) the best tokens/s
of that many timed runs of the first that many prompts (EOS ignored: every prompt generates max_tokens).
Jobs run one after another in this process (one engine at a time).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import time
from typing import Any

from comoe_vllm.plugin import FAMILIES

ARCHITECTURES = {**FAMILIES}


def engine_arguments(model: str, adapter: str | None, architecture: str | None = None) -> dict[str, Any]:
    """LLM(...) / server arguments that serve `adapter` (a comoe folder) on `model`: hf_overrides choosing
    the comoe class of the base's architecture and naming the folder."""
    if adapter is None:
        return {"model": model}
    if architecture is None:
        with open(f"{model}/config.json") as handle:
            architecture = (json.load(handle).get("architectures") or [None])[0]
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"{model}: architecture {architecture!r} is not served with a comoe adapter; served: "
            f"{', '.join(ARCHITECTURES)} (fused-attention families such as Phi-3 or GPT-2 are not); serve it "
            "with comoe's transformers path instead: `comoe generate --adapter DIR`"
        )
    return {
        "model": model,
        "hf_overrides": {"architectures": [ARCHITECTURES[architecture]], "comoe_adapter": adapter},
    }


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams  # noqa: PLC0415  (the engine starts only when a job runs)
    from vllm.lora.request import LoRARequest  # noqa: PLC0415

    os.environ.update(job.get("env", {}))
    if job.get("copy"):
        source, target = job["copy"]
        shutil.copytree(source, target, dirs_exist_ok=True)
    arguments = engine_arguments(job["model"], job.get("adapter"))
    lora = job.get("lora")
    extra: dict[str, Any] = {}
    if lora:
        with open(f"{lora}/adapter_config.json") as handle:
            rank = json.load(handle)["r"]
        extra = dict(enable_lora=True, max_lora_rank=max(8, rank), max_loras=1)
    llm = LLM(
        dtype=job.get("dtype", "float32"),
        tensor_parallel_size=job.get("tensor_parallel_size", 1),
        enforce_eager=job.get("enforce_eager", True),
        max_model_len=job.get("max_model_len", 512),
        kv_cache_memory_bytes=job.get("kv_cache_memory_bytes", 1 << 29),  # 512 MiB, not a share of the RAM
        seed=0,
        **arguments,
        **extra,
    )
    request = LoRARequest("lora", 1, lora) if lora else None
    prompts = [{"prompt_token_ids": ids} for ids in job["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], logprobs=job.get("logprobs", 0))
    outputs = llm.generate(prompts, params, lora_request=request, use_tqdm=False)
    result: dict[str, Any] = {"tokens": [], "logprobs": []}
    for output in outputs:
        completion = output.outputs[0]
        result["tokens"].append(list(completion.token_ids))
        steps = completion.logprobs or []
        result["logprobs"].append([{str(t): p.logprob for t, p in step.items()} for step in steps])
    if job.get("repeats", 0):
        timed = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True)
        result["tokens_per_s"] = {}
        for batch in job.get("batches", [len(prompts)]):
            rates = []
            for _ in range(job["repeats"]):
                start = time.perf_counter()
                done = llm.generate(prompts[:batch], timed, lora_request=request, use_tqdm=False)
                seconds = time.perf_counter() - start
                rates.append(sum(len(o.outputs[0].token_ids) for o in done) / seconds)
            result["tokens_per_s"][str(batch)] = max(rates)
    del llm
    gc.collect()
    return result


def main(argv: list[str]) -> int:
    jobs_path, out_path = argv
    with open(jobs_path) as handle:
        jobs = json.load(handle)
    results = [run_job(job) for job in jobs]
    with open(out_path, "w") as handle:
        json.dump(results, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
