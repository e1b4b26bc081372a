"""Quantized base models through transformers' BitsAndBytesConfig: `--load-in-4bit` (QLoRA's NF4) and
`--load-in-8bit` (LLM.int8).

The quantized linears are only ever called, never trained or de-quantised (comoe.adapter.layer wraps them
as it wraps nn.Linear); the experts stay in their own dtype. The settings name a quantization '4bit' or
'8bit' (comoe.settings.quantization_of, pure Python); this module turns the name into the loader's config.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BitsAndBytesConfig

QUANTIZATIONS = ("4bit", "8bit")


def bnb_config(quantization: str, dtype: torch.dtype) -> BitsAndBytesConfig:
    """The BitsAndBytesConfig of a quantization name.

    '4bit' is the QLoRA recipe: NF4 weights, double quantisation of their scales, bfloat16 compute; under a
    float16 base (`dtype`, the dtype of the layers left unquantised) the compute is float16 too, so that
    two half precisions with different ranges are never mixed (and GPUs without bfloat16 can run it).
    '8bit' is LLM.int8 (its matmul computes in float16 whatever the base dtype).
    """
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float16 if dtype == torch.float16 else torch.bfloat16,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization={quantization!r} is invalid: expected one of {', '.join(QUANTIZATIONS)}")


def quantization_of_model(model: nn.Module) -> str | None:
    """'4bit' or '8bit' for a model whose base was loaded through BitsAndBytesConfig (also inside a comoe,
    PEFT or DDP wrapper), else None."""
    for module in model.modules():
        config = getattr(getattr(module, "config", None), "quantization_config", None)
        if getattr(config, "load_in_4bit", False):
            return "4bit"
        if getattr(config, "load_in_8bit", False):
            return "8bit"
    return None


def without_cpu_repacking(model: nn.Module) -> None:
    """Keep every bitsandbytes 4-bit linear of `model` in its loaded layout on the CPU.

    On CPUs with AVX512-BF16, a Linear4bit repacks its weight for inference on its first eval-mode forward
    without gradients (a validation pass, an evaluation). The packed weight has no backward, so the
    gradient through that layer, to every expert below it, would be silently lost in training (comoe's
    layers turn packing off for the linears they wrap, but the frozen ones, MLPs, pass gradients too); and
    bitsandbytes 0.50 fails to pack a weight whose input width is not a multiple of its 64-value block
    ("shape '[64, 1]' is invalid for input of size 96"). Unpacked, inference is slower on such CPUs only.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
