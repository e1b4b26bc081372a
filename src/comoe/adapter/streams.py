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
        rows, columns = mask.shape
        length = num_tokens // rows if rows else 0
        if rows == 0 or length * rows != num_tokens or length > columns:
            raise ValueError(
                f"{layer or 'a layer'} ({stream} tokens) saw {num_tokens} tokens, which are not the rows "
                f"of the {stream} attention mask of shape {tuple(mask.shape)}: the auxiliary losses "
                "cannot tell its padding"
            )
        flat = mask[:, columns - length :].reshape(-1).bool()
        self._flat[stream, num_tokens] = flat
        return flat


def _two_dimensional(mask: Any) -> torch.Tensor | None:
    """A [batch, length] padding mask, or None (absent, or a 4-D additive mask that is not one)."""
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
