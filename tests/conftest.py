import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_config(**overrides) -> LlamaConfig:
    """A small LLaMA configuration: same module names and code paths as SmolLM2, milliseconds per step."""
    fields = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=128,
    )
    return LlamaConfig(**{**fields, **overrides})


def tiny_llama(seed: int = 0, vocab: int = 128) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(vocab_size=vocab)).eval()


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    return tiny_llama()


# The LLM-Adapters copy beside the repository (as CI lays it out), or wherever COMOE_DATA_DIR points.
DATA_DIR = Path(
    os.environ.get("COMOE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "llm-adapters")
)
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"LLM-Adapters data not found at {DATA_DIR}")


@pytest.fixture(scope="session")
def smol_tokenizer():
    from comoe.models import load_base

    return load_base("smollm2-135m")[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """A tiny random LLaMA with SmolLM2's tokenizer saved as a local model folder (for end-to-end runs)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(vocab=len(smol_tokenizer)).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder
