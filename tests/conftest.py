"""Fixtures shared by every test module (plain helpers are in tests/helpers.py)."""

from pathlib import Path

import pytest
from transformers import LlamaForCausalLM

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
