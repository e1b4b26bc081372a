"""`comoe serve`: the serving environment's command line (fast), and, with the serving environment built
(`make serve-setup`), vLLM serving comoe adapters: greedy tokens equal to comoe's transformers `generate`
and log-probabilities within float32 tolerance, the OpenAI-compatible server, tensor parallel 2, and a
compiled graph never reused for a changed adapter (slow)."""

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from comoe.adapter.model import get_comoe_model
from comoe.config import ComoeConfig
from comoe.models.gguf import alias_cache, cache_root
from comoe.models.loading import load_base
from comoe.serving.server import DEFAULT_VENV, serve_command
from comoe.serving.settings import SERVE_PYTHON_ENV, ServeArgs
from tests.helpers import TINY_SIZES, tiny_config, tiny_llama


@pytest.fixture
def fake_python(tmp_path):
    python = tmp_path / "python"
    python.write_text("")
    return str(python)


def _adapter(folder: Path, base: str | None) -> Path:
    model = get_comoe_model(tiny_llama(), ComoeConfig.preset("moe"))
    model.config._name_or_path = base
    model.save_pretrained(folder)
    return folder


def test_command_serves_the_recorded_base_through_the_plugin(tmp_path, fake_python):
    folder = _adapter(tmp_path / "adapter", "smollm2-135m")
    command = serve_command(
        ServeArgs(adapter=str(folder), python=fake_python, port=8123, vllm_args="--seed 3")
    )
    assert command[:3] == [fake_python, "-m", "comoe_vllm.serve"]
    flags = dict(zip(command[3::2], command[4::2], strict=False))
    assert flags["--adapter"] == str(folder.resolve())
    assert flags["--model"] == str(alias_cache("smollm2-135m", cache_root(None)))  # the alias's folder
    assert flags["--served-model-name"] == "adapter"
    assert (flags["--port"], flags["--host"], flags["--dtype"]) == ("8123", "127.0.0.1", "float32")
    assert command[-2:] == ["--seed", "3"]


def test_model_flag_overrides_the_recorded_base(tmp_path, fake_python):
    folder = _adapter(tmp_path / "adapter", None)
    command = serve_command(ServeArgs(adapter=str(folder), model=str(tmp_path), python=fake_python))
    assert command[command.index("--model") + 1] == str(tmp_path.resolve())
    with pytest.raises(ValueError, match="records no base model"):
        serve_command(ServeArgs(adapter=str(folder), python=fake_python))


def test_missing_serving_environment_names_make_serve_setup(tmp_path):
    folder = _adapter(tmp_path / "adapter", "smollm2-135m")
    with pytest.raises(FileNotFoundError, match="make serve-setup"):
        serve_command(ServeArgs(adapter=str(folder), python=str(tmp_path / "none")))


# --- vLLM itself (slow: engines start in the serving environment) ---------------------------------------

SERVE_PYTHON = Path(os.environ.get(SERVE_PYTHON_ENV) or DEFAULT_VENV / "bin" / "python")
# vLLM engines take minutes on 2 cores. `make test` builds the serving environment and runs the core
# (COMOE_TEST_SERVING=core: the tiny LLaMA's comoe, moe and soft parity, the OpenAI server); `make
# test-serve` runs everything (COMOE_TEST_SERVING=1: also SmolLM2-135M, the other families, tensor
# parallel 2 and a compiled engine; 6 to 15 minutes here).
SERVING = os.environ.get("COMOE_TEST_SERVING", "")
# built: an explicit environment, or .venv-serve completed by `make serve-setup` (its stamp; a build that
# failed half-way has a python but no stamp)
SERVE_READY = SERVE_PYTHON.is_file() and (
    bool(os.environ.get(SERVE_PYTHON_ENV)) or (DEFAULT_VENV / ".installed").is_file()
)
needs_serving = pytest.mark.skipif(
    not SERVE_READY or SERVING not in ("1", "core"),
    reason=f"vLLM serving tests run with `make test` / `make test-serve` (the serving environment "
    f"{SERVE_PYTHON}, COMOE_TEST_SERVING=core or 1)",
)
needs_full_serving = pytest.mark.skipif(
    SERVING != "1", reason="run by `make test-serve` (COMOE_TEST_SERVING=1), past make test's budget"
)
FULL = SERVING == "1"
PROMPTS = ["Hello world", "The capital of France is", "1 2 3 4 5", "Spell this word backward: sun"]
NEW_TOKENS = 8
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
LOGPROB_TOLERANCE = 1e-4  # float32 engines on both sides
LOGPROBS = 3  # vLLM's top log-probabilities per generated token, compared with comoe's
ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The inference paths served, on the tiny LLaMA and on SmolLM2-135M: top-k (comoe, and moe on part of the
# linears and blocks: packed layers with some slices adapted) and soft routing.
CASES = {
    "comoe": ComoeConfig.preset("comoe", target_modules=ALL_LINEARS),
    "moe": ComoeConfig.preset("moe", target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
    "soft": ComoeConfig.preset("moe", routing="soft", target_modules=ALL_LINEARS),
}
# The engines' thread binding on this 2-core machine: one rank on core 0 (tensor parallel 2: one each).
SERVER_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_OMP_THREADS_BIND": "0"}
# offline: the engine in the runner's process, one process start less per job
ENGINE_ENV = {**SERVER_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def _trained(base, config: ComoeConfig, scale: float, seed: int = 0):
    """`base` with `config`'s experts drawn away from their zero start (as after training)."""
    model = get_comoe_model(base, config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
            elif "router" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


def _greedy(model, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """comoe's transformers generate: greedy tokens and each step's log-softmax of the logits."""
    tokens, logprobs = [], []
    for ids in prompts:
        out = model.generate(
            input_ids=torch.tensor([ids]),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        tokens.append(out.sequences[0, len(ids) :].tolist())
        logprobs.append([torch.log_softmax(step[0].float(), dim=-1) for step in out.logits])
    return tokens, logprobs


def _serving_llama(folder: Path, tokenizer) -> Path:
    """A tiny random LLaMA whose head size vLLM's CPU attention has (32), with SmolLM2's tokenizer."""
    torch.manual_seed(0)
    config = tiny_config(
        hidden_size=128, intermediate_size=192, vocab_size=len(tokenizer), max_position_embeddings=512
    )
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# The other served families, as tiny random models (LLaMA's sizes; Gemma's head size given: it has its own).
FAMILIES = {
    "mistral": (MistralConfig, MistralForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "gemma": (GemmaConfig, GemmaForCausalLM, {"head_dim": 32}),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, {"head_dim": 32}),
}


def _serving_family(folder: Path, tokenizer, family: str) -> Path:
    config_class, model_class, extra = FAMILIES[family]
    sizes = dict(TINY_SIZES, hidden_size=128, intermediate_size=192, vocab_size=len(tokenizer), max_position_embeddings=512)
    torch.manual_seed(0)
    model_class(config_class(**sizes, **extra)).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def parity(tmp_path_factory, smol_tokenizer):
    """Every case on both bases, tensor parallel 2, and a compiled engine for an adapter changed in place,
    served in one process of the serving environment; with comoe's own outputs for each."""
    root = tmp_path_factory.mktemp("serving")
    prompts = [smol_tokenizer(text)["input_ids"] for text in PROMPTS]
    bases = {"tiny": (str(_serving_llama(root / "tiny", smol_tokenizer)), 0.05)}
    if FULL:
        bases["smollm2"] = (str(alias_cache("smollm2-135m", cache_root(None))), 0.01)
    runs = [(f"{b}-{c}", folder, config, scale) for b, (folder, scale) in bases.items() for c, config in CASES.items()]
    runs += [(f"family-{name}", str(_serving_family(root / name, smol_tokenizer, name)), CASES["comoe"], 0.05)
             for name in (FAMILIES if FULL else [])]
    cases, jobs = {}, []
    for name, folder, config, scale in runs:
        base = load_base(folder)[0]
        if name.endswith("-moe"):  # every other block (packed layers with some slices, blocks without experts)
            config = dataclasses.replace(config, layers_to_transform=list(range(1, base.config.num_hidden_layers, 2)))
        model = _trained(base, config, scale)
        model.save_pretrained(root / name)
        with model.disable_adapters():
            base_logprobs = _greedy(model, prompts)[1]
        cases[name] = (_greedy(model, prompts), base_logprobs)
        if name == "tiny-comoe":
            chat = smol_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
            chat_ids = list(chat["input_ids"] if hasattr(chat, "keys") else chat)
            cases["chat"] = (_greedy(model, [chat_ids]), None)
        jobs.append(dict(model=folder, adapter=str(root / name), prompts=prompts, max_tokens=NEW_TOKENS,
                         logprobs=LOGPROBS, env=ENGINE_ENV))
    tiny = bases["tiny"][0]
    full_jobs = []
    full_jobs.append(dict(jobs[0], tensor_parallel_size=2, env={**ENGINE_ENV, "VLLM_CPU_OMP_THREADS_BIND": "0|1"}))
    # compiled: the comoe adapter, then another (top-1, other weights) copied over it at the same path
    changed = _trained(
        load_base(tiny)[0], ComoeConfig.preset("moe", top_k=1, target_modules=ALL_LINEARS), 0.05, seed=1
    )
    changed.save_pretrained(root / "changed")
    cases["changed"] = (_greedy(changed, prompts), None)
    shutil.copytree(root / "tiny-comoe", root / "in-place")
    compiled = dict(
        jobs[0],
        adapter=str(root / "in-place"),
        enforce_eager=False,
        logprobs=0,
        env={**ENGINE_ENV, "VLLM_CACHE_ROOT": str(root / "vllm-cache")},
    )
    full_jobs += [compiled, dict(compiled, copy=[str(root / "changed"), str(root / "in-place")])]
    jobs += full_jobs if FULL else []
    (root / "jobs.json").write_text(json.dumps(jobs))
    run = subprocess.run(
        [str(SERVE_PYTHON), "-m", "comoe_vllm.offline", str(root / "jobs.json"), str(root / "out.json")],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((root / "out.json").read_text())
    names = [name for name, *_ in runs]
    extra = ["tp2", "compiled", "compiled-changed"] if FULL else []
    served = dict(zip([*names, *extra], results, strict=True))
    measured = {  # what docs/serving.md reports: per case, tokens compared and the largest log-prob gap
        name: {"tokens": sum(map(len, served[name]["tokens"])),
               "max_logprob_gap": _max_logprob_gap(cases["tiny-comoe" if name == "tp2" else name][0][1], served[name])}
        for name in [*names, *extra[:1]]
    }
    (root / "measured.json").write_text(json.dumps(measured, indent=1))
    return cases, served, root


def _max_logprob_gap(expected_logprobs, served) -> float:
    return max(
        abs(expected_logprobs[p][step][int(token)].item() - value)
        for p, steps in enumerate(served["logprobs"])
        for step, top in enumerate(steps)
        for token, value in top.items()
    )


@needs_serving
@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [f"tiny-{c}" for c in CASES]
    + [pytest.param(f"smollm2-{c}", marks=needs_full_serving) for c in CASES]
    + [pytest.param(f"family-{f}", marks=needs_full_serving) for f in FAMILIES],
)
def test_vllm_serves_comoes_tokens_and_logprobs(parity, case):
    cases, results, _ = parity
    (tokens, logprobs), base_logprobs = cases[case]
    changed = max((mine[0] - base[0]).abs().max().item() for mine, base in zip(logprobs, base_logprobs, strict=True))
    assert changed > 100 * LOGPROB_TOLERANCE  # the adapter changes the model's answer: the test could fail
    assert results[case]["tokens"] == tokens
    assert _max_logprob_gap(logprobs, results[case]) < LOGPROB_TOLERANCE


@needs_serving
@needs_full_serving
@pytest.mark.slow
def test_tensor_parallel_2_serves_the_same_tokens(parity):
    cases, results, _ = parity
    (tokens, logprobs), _ = cases["tiny-comoe"]
    assert results["tp2"]["tokens"] == tokens
    assert _max_logprob_gap(logprobs, results["tp2"]) < LOGPROB_TOLERANCE


@needs_serving
@needs_full_serving
@pytest.mark.slow
def test_a_changed_adapter_never_reuses_a_stale_compiled_graph(parity):
    """Compiled (torch.compile) for the comoe adapter, then the same path holding a top-1 adapter: vLLM's
    compile-cache key holds the adapter's fingerprint, so the second engine compiles its own graph."""
    cases, results, root = parity
    assert results["compiled"]["tokens"] == cases["tiny-comoe"][0][0]
    assert results["compiled-changed"]["tokens"] == cases["changed"][0][0]
    keys = {rank.parent for rank in (root / "vllm-cache").rglob("rank_0_0")}  # one folder per cache key
    assert len(keys) == 2


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@needs_serving
@pytest.mark.slow
def test_comoe_serve_answers_openai_completion_and_chat_with_comoes_tokens(parity, smol_tokenizer):
    """`comoe serve` on loopback: a completion and a chat request (the OpenAI API, as a client sends them)
    answer with the tokens comoe's generate gives for the same prompt and chat template."""
    cases, _, root = parity
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "comoe.cli",
        "serve",
        "--adapter",
        str(root / "tiny-comoe"),
        "--model",
        str(root / "tiny"),
        "--port",
        str(port),
        "--enforce-eager",
        "--kv-cache-gib",
        "0.25",
    ]
    server = subprocess.Popen(
        command,
        env={**os.environ, **SERVER_ENV},
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 900
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the server did not start in 15 minutes"
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=5) as response:
                    assert json.loads(response.read())["data"][0]["id"] == "tiny-comoe"
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(2)
        completion = _post(
            f"{url}/completions",
            {
                "model": "tiny-comoe",
                "prompt": PROMPTS[0],
                "max_tokens": NEW_TOKENS,
                "temperature": 0,
                "return_token_ids": True,
            },
        )
        assert completion["choices"][0]["token_ids"] == cases["tiny-comoe"][0][0][0]
        chat = _post(
            f"{url}/chat/completions",
            {
                "model": "tiny-comoe",
                "messages": CHAT,
                "max_tokens": NEW_TOKENS,
                "temperature": 0,
                "return_token_ids": True,
            },
        )
        expected = cases["chat"][0][0][0]
        assert chat["choices"][0]["message"]["content"] == smol_tokenizer.decode(
            expected, skip_special_tokens=True
        )
        assert chat["choices"][0].get("token_ids", expected) == expected
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
