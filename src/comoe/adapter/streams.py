"""Which tokens the auxiliary losses count: the padding mask of each token stream, bound from the call.

A layer's auxiliary losses average over the real (non-padding) tokens of the input it saw. Decoder-only
models have one token stream, masked by `attention_mask`; encoder-decoder models have two: encoder-side
layers (and the decoder's cross-attention keys and values, which project encoder states) see the encoder
tokens, masked by `attention_mask`; the other decoder layers see the decoder tokens, masked by
`decoder_attention_mask` (all real when it is not given). The mask is bound from the wrapped forward's
signature, so a mask passed by position counts as one passed by keyword, and with a KV cache a layer sees
only the new tokens: the mask's last T columns. Each layer's stream is fixed when it is injected; a mask
is never matched to a layer by its token count.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from comoe.moe.prompt import PROMPT_CACHED, PROMPT_MASK
from comoe.moe.record import token_columns

DECODER = "decoder"
ENCODER = "encoder"
# Decoder-side modules whose input is the encoder's output (cross-attention keys and values): T5, BART /
# Whisper / Marian and the BERT-style cross-attention of encoder-decoder pairs.
_CROSS_ATTENTION_INPUTS = re.compile(
    r"(EncDecAttention\.(k|v)|encoder_attn\.(k_proj|v_proj)|crossattention\.self\.(key|value))$"
)


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def layer_streams(model: nn.Module, names: list[str]) -> dict[str, str]:
    """The token stream of each named module of `model`: ENCODER or DECODER."""
    if not is_encoder_decoder(model) or not hasattr(model, "get_encoder"):
        return dict.fromkeys(names, DECODER)
    encoder = model.get_encoder()
    prefix = next((name for name, module in model.named_modules() if module is encoder), None)
    streams = {}
    for name in names:
        inside = prefix is not None and (prefix == "" or name.startswith(prefix + "."))
        streams[name] = ENCODER if inside or _CROSS_ATTENTION_INPUTS.search(name) else DECODER
    return streams


def bound_arguments(forward: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by parameter name (`**kwargs` entries flattened), whether given by position or
    keyword; the keywords alone when the signature cannot be bound."""
    try:
        signature = inspect.signature(forward)
        bound = signature.bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return dict(kwargs)
    values: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            values.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            values[name] = value
    return values


IGNORE_LABEL = -100  # the label value transformers' causal-LM loss skips (comoe's collate: the prompt)


def cached_length(arguments: dict[str, Any]) -> int:
    """How many tokens the call's KV cache already holds (`cache`, or `past_key_values` before transformers
    5.2x; a Cache's get_seq_length, or a legacy tuple's key length); 0 without one."""
    cache = arguments.get("cache", arguments.get("past_key_values"))
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0


def prompt_inputs(arguments: dict[str, Any], prompt: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The per-call inputs of prompt-aware routing (comoe.moe.prompt) from a call's bound arguments:
    PROMPT_MASK [B, L] bool, the call's prompt tokens -- the real tokens (attention_mask) that `prompt`
    [B, L] marks, or else whose label is -100 when labels [B, L] are given (a sequence without such a token:
    all its real tokens), every real token otherwise -- and PROMPT_CACHED when the call continues a KV cache
    (a decode step: the mask is all False and the layers reuse the prompt's decision). {} when the call has
    neither input_ids nor inputs_embeds."""
    ids = arguments.get("input_ids")
    shape = ids.shape if isinstance(ids, torch.Tensor) else None
    embeds = arguments.get("inputs_embeds")
    if shape is None and isinstance(embeds, torch.Tensor):
        shape = embeds.shape[:2]
    if shape is None:
        return {}
    device = (ids if isinstance(ids, torch.Tensor) else embeds).device
    if cached_length(arguments) > 0:
        decode = torch.zeros(shape, dtype=torch.bool, device=device)
        return {PROMPT_MASK: decode, PROMPT_CACHED: torch.ones(1)}
    mask = _two_dimensional(arguments.get("attention_mask"))
    real = torch.ones(shape, dtype=torch.bool, device=device) if mask is None else mask[:, -shape[1] :].bool()
    labels = arguments.get("labels")
    if prompt is None and isinstance(labels, torch.Tensor) and labels.shape == real.shape:
        prompt = labels == IGNORE_LABEL
    if prompt is None:
        return {PROMPT_MASK: real}
    if tuple(prompt.shape) != tuple(real.shape):
        raise ValueError(f"prompt_mask: shape {tuple(prompt.shape)}, expected input_ids' {tuple(real.shape)}")
    prompt = real & prompt.to(device=real.device, dtype=torch.bool)
    return {PROMPT_MASK: torch.where(prompt.any(dim=1, keepdim=True), prompt, real)}


@dataclass(frozen=True)
class TokenMasks:
    """The [batch, length] padding mask of each token stream of one call (absent or None: all real)."""

    by_stream: dict[str, torch.Tensor | None] = field(default_factory=dict)
    # (stream, tokens) -> the flattened mask: computed once per call, not once per layer
    _flat: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def bind(cls, arguments: dict[str, Any], encoder_decoder: bool) -> TokenMasks:
        """The masks of a call's bound arguments (see bound_arguments)."""
        if encoder_decoder:
            decoder = arguments.get("decoder_attention_mask")
            masks = {ENCODER: arguments.get("attention_mask"), DECODER: decoder}
        else:
            masks = {DECODER: arguments.get("attention_mask")}
        return cls({stream: _two_dimensional(mask) for stream, mask in masks.items()})

    def for_layer(self, stream: str, num_tokens: int, layer: str = "") -> torch.Tensor | None:
        """[num_tokens] bool, True for real tokens, for a layer of `stream` that saw `num_tokens` tokens
        (batch x length, flattened): the last length columns of the stream's mask (a KV cache holds the
        earlier ones). None when the stream has no mask. ValueError when the tokens cannot be those of
        the mask's rows."""
        mask = self.by_stream.get(stream)
        if mask is None:
            return None
        if (stream, num_tokens) in self._flat:
            return self._flat[stream, num_tokens]
        columns = token_columns(mask, num_tokens)
        if columns is None:
            raise ValueError(
                f"{layer or 'a layer'} ({stream} tokens) saw {num_tokens} tokens, which are not the rows "
                f"of the {stream} attention mask of shape {tuple(mask.shape)}: the auxiliary losses "
                "cannot tell its padding"
            )
        flat = columns.reshape(-1).bool()
        self._flat[stream, num_tokens] = flat
        return flat


def _two_dimensional(mask: Any) -> torch.Tensor | None:
    """A [batch, length] padding mask, or None (absent, or a 4-D additive mask that is not one)."""
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
