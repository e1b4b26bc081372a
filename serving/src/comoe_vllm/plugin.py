"""The vLLM plugin (entry point `vllm.general_plugins: comoe`): registers the comoe model classes by name,
lazily, so that vLLM imports comoe_vllm.models only where a model is built."""

from __future__ import annotations

# Hugging Face architecture -> the comoe class that serves an adapter on it (comoe_vllm.models).
FAMILIES = {
    "LlamaForCausalLM": "ComoeLlamaForCausalLM",
    "MistralForCausalLM": "ComoeMistralForCausalLM",
    "Qwen2ForCausalLM": "ComoeQwen2ForCausalLM",
    "GemmaForCausalLM": "ComoeGemmaForCausalLM",
    "Gemma2ForCausalLM": "ComoeGemma2ForCausalLM",
    "Gemma3ForCausalLM": "ComoeGemma3ForCausalLM",
}


def register() -> None:
    from vllm import ModelRegistry  # noqa: PLC0415  (vLLM calls this in each of its processes)

    for name in FAMILIES.values():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"comoe_vllm.models:{name}")
