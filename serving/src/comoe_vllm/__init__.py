"""comoe-vllm: serve comoe adapters (routed mixtures of LoRA experts) in vLLM as a model plugin.

comoe_vllm.adapter and comoe_vllm.mixture need only torch and safetensors; comoe_vllm.models imports vLLM.
"""
