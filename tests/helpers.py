"""What several test modules share: tiny models, the data location, layer references, run settings.

Fixtures live in conftest.py; plain functions and constants live here, so no test module imports another.
"""

import json
import os
import random
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from comoe.adapter.layer import ComoeContext, ComoeLinear
from comoe.adapter.model import get_comoe_model
from comoe.cli import main
from comoe.config import ComoeConfig
from comoe.data import Example
from comoe.data.collate import IGNORE_INDEX, encode_examples
from comoe.data.sources import examples_from_records
from comoe.models.loading import load_base
from comoe.training.settings import TrainArgs

# The sizes of every tiny test model (milliseconds per step); families add their own fields.
TINY_SIZES = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=128,
)


def tiny_config(**overrides) -> LlamaConfig:
    """A small LLaMA configuration: same module names and code paths as SmolLM2, milliseconds per step."""
    return LlamaConfig(**{**TINY_SIZES, **overrides})


def tiny_llama(seed: int = 0, vocab: int = 128) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(vocab_size=vocab)).eval()


# The LLM-Adapters copy beside the repository (as CI lays it out), or wherever COMOE_DATA_DIR points.
DATA_DIR = Path(
    os.environ.get("COMOE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "llm-adapters")
)
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"LLM-Adapters data not found at {DATA_DIR}")


def make_layer(d_in, d_out, n, k, r, strategy, dtype=torch.float32, routing="topk", seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=True).to(dtype)
    config = ComoeConfig(
        num_experts=n,
        top_k=k,
        r=r,
        lora_alpha=2.0 * r,
        lora_dropout=0.0,
        expert_compute=strategy,
        routing=routing,
    )
    layer = ComoeLinear(base, config, ComoeContext())
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)  # non-zero B so the experts contribute and get gradients
        layer.router.weight.normal_(0, 1.0)
    return layer


def dense_reference(layer: ComoeLinear, x: torch.Tensor) -> torch.Tensor:
    """Every expert computed for every token, then masked by the top-k gates (renormalised unless the layer
    keeps the router's probabilities, as top-1 does by default)."""
    flat = x.reshape(-1, layer.in_features).double()
    probs = torch.softmax(flat @ layer.router.weight.double().t(), dim=-1)
    if layer.routing_kind.dense:
        gates = probs
    else:
        top, idx = probs.topk(layer.top_k, dim=-1)
        top = top / top.sum(-1, keepdim=True) if layer.normalize_gates else top
        gates = torch.zeros_like(probs).scatter(1, idx, top)
    outs = torch.einsum("td,nrd->tnr", flat, layer.lora_A.double())
    outs = torch.einsum("tnr,nro->tno", outs, layer.lora_B.double()) * layer.scaling
    delta = (outs * gates.unsqueeze(-1)).sum(1)
    base = flat @ layer.base_layer.weight.double().t() + layer.base_layer.bias.double()
    return (base + delta).view(*x.shape[:-1], -1)


def grads(layer, x, out, seed=1):
    torch.manual_seed(seed)
    g = torch.randn_like(out, dtype=torch.float64)
    params = [x, layer.router.weight, layer.lora_A, layer.lora_B]
    return torch.autograd.grad((out.double() * g).sum(), params)


def train_args(model_dir, out, **fields):
    base = dict(
        model=str(model_dir),
        preset="comoe",
        train_limit=4,
        max_steps=4,
        batch_size=4,
        cutoff=96,
        save_steps=2,
        output=str(out),
        adapter_config={"r": 4, "num_experts": 4},
        lr=1e-3,
    )
    return TrainArgs(**{**base, **fields})


WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "why",
    "how",
    "which",
    "blue",
    "red",
    "green",
    "runs",
    "jumps",
    "over",
    "under",
    "quickly",
]


def questions(count: int, seed: int = 0) -> list[Example]:
    """Multiple-choice examples with 2-5 options and prompts of 3-40 words (different lengths in a batch)."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        options = [f"answer{i + 1}" for i in range(rng.randint(2, 5))]
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))
        instruction = f"{words}?\n\nAnswer format: {'/'.join(options)}"
        examples.append(Example("ARC-Easy", instruction, "", "", rng.choice(options)))
    return examples


def trainer_fields(folder, **overrides) -> dict:
    """TrainingArguments / SFTConfig fields for a few CPU steps of a tiny model, checkpoint every 2."""
    fields = dict(
        output_dir=str(folder),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        report_to=[],
        logging_steps=2,
        save_steps=2,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return {**fields, **overrides}


def one_line_error(capsys, argv, code=2) -> str:
    """Run the command line; it must fail with `code` and one 'comoe: ...' line, no traceback."""
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no message"
    message = err[-1]  # after any progress bars of the model loader
    assert message.startswith("comoe:") and "Traceback" not in "\n".join(err), err
    return message


def assert_auxiliary_gradient(trainer, model) -> None:
    """The gradient of the trainer's loss on a batch is that of its task loss plus the weighted auxiliary
    loss (computed with the caller adding it by hand), and differs from the task loss's alone."""
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient(loss, retain=False):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=retain)])

    got = gradient(trainer.compute_loss(model, dict(batch)))
    with model.caller_adds_aux_loss():
        task = trainer.compute_loss(model, dict(batch))
    aux = model.weighted_aux_loss * model.aux_gradient_scale
    assert float(aux) > 0
    without = gradient(task, retain=True)
    torch.testing.assert_close(got, gradient(task + aux), rtol=1e-4, atol=1e-7)
    assert (got - without).norm() > 1e-3 * without.norm()


def count_config_reads(monkeypatch) -> list[Path]:
    """Every adapter_config.json that comoe.adapter.folder reads from now on (the test's monkeypatch undoes
    the counting)."""
    import comoe.adapter.folder as folder

    reads: list[Path] = []
    real = folder.read_json

    def counting(path, missing):
        reads.append(Path(path))
        return real(path, missing)

    monkeypatch.setattr(folder, "read_json", counting)
    return reads


# ---- your own data: records, their tokenisation by a real tokenizer ---------------------------------------
CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def encode_records(tokenizer, records: list[dict], **options) -> tuple[list[Example], list]:
    """Records of task 'mytask' as Examples and as the token ids and labels training uses."""
    examples = examples_from_records(records, "test", "mytask", **options)
    items, _ = encode_examples(tokenizer, examples, cutoff=512)
    return examples, items


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def learned_ids(item) -> list[int]:
    """The token ids an encoded example learns (labels that are not ignored)."""
    return [token for token in item.labels if token != IGNORE_INDEX]


def adapted(folder) :
    """The tiny model saved in `folder` with a comoe adapter whose experts are non-zero, in eval mode."""
    base, _ = load_base(str(folder))
    model = get_comoe_model(base, ComoeConfig.preset("comoe", r=4, lora_dropout=0.0))
    with torch.no_grad():
        for layer in model.comoe_layers().values():
            layer.lora_B.normal_(0, 0.2)
    return model.eval()


def task_routed(base: nn.Module, preset: str = "moelora-liu", tasks: tuple[str, ...] = ("a", "b")):
    """`base` with an adapter of `preset` and task vocabulary `tasks`, in eval mode, as if trained: non-zero
    experts and, for routing 'task', gates of N(0, 1) entries, so that each task's gate differs clearly."""
    torch.manual_seed(0)
    model = get_comoe_model(base, ComoeConfig.preset(preset, tasks=list(tasks), r=4, lora_dropout=0.0))
    with torch.no_grad():
        for layer in model.comoe_layers().values():
            layer.lora_B.normal_(0, 0.2)
            if layer.routing_kind.inputs:  # the task gate W_T [n, d_t]; its embeddings are N(0, 1) already
                layer.router.weight.normal_()
    return model.eval()


def argmax_loop(model, tokenizer, ids: list[int], new_tokens: int, **inputs) -> str:
    """Greedy decoding by hand: the full sequence through the model for every new token, no cache; `inputs`
    are the model's per-call keywords (e.g. task_ids) given explicitly on every call."""
    ids = list(ids)
    generated = []
    with torch.no_grad():
        for _ in range(new_tokens):
            token = int(model(input_ids=torch.tensor([ids]), **inputs).logits[0, -1].argmax())
            generated.append(token)
            ids.append(token)
            if token == tokenizer.eos_token_id:
                break
    return tokenizer.decode(generated, skip_special_tokens=True)
