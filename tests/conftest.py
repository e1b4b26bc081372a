"""Fixtures shared by every test module (plain helpers are in tests/helpers.py)."""

import os

# comoe's Triton kernels (CUDA) run in Triton's interpreter here. Triton fixes the mode when it is imported
# (torch, transformers and comoe may import it), so this comes first; TRITON_INTERPRET=0 in the
# environment keeps compiled kernels on a GPU machine.
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from comoe.models import load_base
from tests.helpers import tiny_llama


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="session")
def smol_tokenizer():
    return load_base("smollm2-135m")[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """A tiny random LLaMA with SmolLM2's tokenizer saved as a local model folder (for end-to-end runs)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(vocab=len(smol_tokenizer)).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """A tiny random GPT-2 whose context is 32 positions (learned position embeddings: a longer sequence
    indexes past them), with SmolLM2's tokenizer, saved as a local model folder."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    ids = dict(bos_token_id=smol_tokenizer.bos_token_id, eos_token_id=smol_tokenizer.eos_token_id)
    config = GPT2Config(n_positions=32, n_embd=64, n_layer=2, n_head=4, vocab_size=len(smol_tokenizer), **ids)
    GPT2LMHeadModel(config).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder
