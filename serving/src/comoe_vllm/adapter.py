"""Reading a comoe adapter folder for serving, without importing comoe.

A folder is adapter_config.json (ComoeConfig's fields, `adapter_type: "comoe"`, `format_version: 1`) plus
adapter_model.safetensors with, per adapted linear (its Hugging Face module path `M`):

- `M.router.weight` [n, d_in]: the router W_g;
- the experts, laid out by the expert bank (comoe.moe.banks): `lora` (`M.lora_A` [n, r, d_in], `M.lora_B`
  [n, r, d_out], B stored transposed relative to PEFT's lora_B.weight), `hydra` (HydraLoRA, arXiv
  2404.19245: one shared `M.lora_A` [r, d_in], n heads `M.lora_B` [n, r, d_out]) and `omoe` (OMoE, arXiv
  2501.10062: `M.lora_A` [n, r, d_in] and `M.lora_V` [n, r, d_out], B the Gram-Schmidt orthonormalisation
  of V's n * r rows).

Every bank's inference is the same routed mixture, so the reader turns each into plain experts A [n, r,
d_in], B [n, r, d_out] (hydra's A repeated per head, omoe's B orthonormalised once, in float32, as comoe's
forward does): `y = W0 x + sum_{i in topk(softmax(W_g x))} g_i (lora_alpha / r) B_i^T A_i x`. What is not
a routed LoRA mixture at inference is refused with a ValueError that names the field and the alternative.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
DATA_NAME = "comoe_data.json"
FORMAT_VERSION = 1
ROUTER = "router.weight"
BANKS = {"lora": ("lora_A", "lora_B"), "hydra": ("lora_A", "lora_B"), "omoe": ("lora_A", "lora_V")}
# Fields whose non-empty values make inference something else than one routed LoRA mixture per linear.
# Not `tasks`: `comoe train` records it for every adapter that reads task ids, and at inference only task
# routing reads it (refused by routing_of); LoRAMoE's adapters carry it for their training loss alone.
UNSERVED_FIELDS = ("modules_to_save", "ffn_experts")
# Where a model that comoe-vllm does not serve still runs: comoe's own transformers path.
ALTERNATIVE = "serve it with comoe's transformers path instead: `comoe generate --adapter DIR`"


@dataclass(frozen=True)
class Experts:
    """One adapted linear's routed LoRA mixture, as plain tensors (the file's dtype, on the CPU)."""

    router: torch.Tensor  # [n, d_in]
    lora_A: torch.Tensor  # [n, r, d_in]
    lora_B: torch.Tensor  # [n, r, d_out]

    @property
    def num_experts(self) -> int:
        return self.lora_A.shape[0]

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[2]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[2]


@dataclass(frozen=True)
class Routing:
    """How a token's experts are chosen and weighted (comoe.moe.routing.route): softmax over the experts in
    float32, then every expert (soft) or the top_k, their probabilities renormalised when `normalize`."""

    top_k: int
    soft: bool
    normalize: bool
    scaling: float  # lora_alpha / r


@dataclass(frozen=True)
class ComoeAdapter:
    """A comoe adapter folder read for serving: its routing, its experts by Hugging Face module path, the
    base model it records, and a fingerprint of both files (what a compiled graph's cache key must hold)."""

    path: Path
    routing: Routing
    experts: dict[str, Experts]
    base_model: str | None
    fingerprint: str
    config: dict[str, Any] = field(repr=False)

    @classmethod
    def read(cls, directory: str | os.PathLike) -> ComoeAdapter:
        """Read and check a folder; ValueError naming the file and field for what is not served,
        FileNotFoundError for a missing file."""
        path = Path(directory)
        config = read_config(path)
        routing = routing_of(config, path / CONFIG_NAME)
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: adapter weights not found")
        experts = read_experts(weights, config.get("expert_bank", "lora"))
        base = config.get("base_model_name_or_path")
        return cls(
            path,
            routing,
            experts,
            base if isinstance(base, str) and base else None,
            fingerprint(path),
            config,
        )


def read_config(path: Path) -> dict[str, Any]:
    """adapter_config.json of a comoe folder, checked for what serving cannot do."""
    file = path / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no adapter config here (is this an adapter folder?)")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: not valid JSON: {error}") from None
    if not isinstance(config, dict) or config.get("adapter_type") != "comoe":
        raise ValueError(
            f"{file}: not a comoe adapter (adapter_type must be 'comoe'); a PEFT LoRA folder is served by "
            "vLLM itself: --enable-lora --lora-modules NAME=DIR"
        )
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{file}: format_version {config.get('format_version')!r} is not supported "
            f"(comoe-vllm reads {FORMAT_VERSION})"
        )
    for name in UNSERVED_FIELDS:
        if config.get(name):
            raise ValueError(
                f"{file}: {name}={config[name]!r} is not served (comoe-vllm serves routed LoRA mixtures on "
                f"vLLM's own linears, nothing that replaces a module); {ALTERNATIVE}"
            )
    bank = config.get("expert_bank", "lora")
    if bank not in BANKS:
        raise ValueError(
            f"{file}: expert_bank={bank!r} is not served; served banks: {', '.join(BANKS)} "
            f"(their inference is a routed LoRA mixture); {ALTERNATIVE}"
        )
    data = path / DATA_NAME
    quantization = _recorded_quantization(data)
    if quantization:
        raise ValueError(
            f"{data}: the adapter was trained on a base quantized as {quantization!r}; quantized bases are "
            f"not served (the experts learnt that base's rounding); {ALTERNATIVE} --load-in-4bit or 8bit"
        )
    return config


def _recorded_quantization(data: Path) -> str | None:
    if not data.is_file():
        return None
    try:
        values = json.loads(data.read_text())
    except json.JSONDecodeError:
        return None
    found = values.get("quantization") if isinstance(values, dict) else None
    return found if isinstance(found, str) and found else None


def routing_of(config: dict[str, Any], file: Path) -> Routing:
    """The routing fields of a config: top_k, routing ('topk' or 'soft'), norm_topk_prob (None or absent:
    renormalise for top_k >= 2, as comoe.config.ComoeConfig.normalize_gates), lora_alpha / r."""
    try:
        top_k, r, alpha = int(config["top_k"]), int(config["r"]), float(config["lora_alpha"])
        routing = config.get("routing", "topk")
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{file}: missing or invalid field {error}") from None
    if routing not in ("topk", "soft"):
        raise ValueError(f"{file}: routing={routing!r} is not served; served: 'topk', 'soft'; {ALTERNATIVE}")
    if top_k < 1 or r < 1 or alpha <= 0:
        raise ValueError(f"{file}: top_k={top_k}, r={r}, lora_alpha={alpha}: each must be positive")
    norm = config.get("norm_topk_prob")
    normalize = norm if isinstance(norm, bool) else top_k > 1
    return Routing(top_k=top_k, soft=routing == "soft", normalize=normalize, scaling=alpha / r)


def read_experts(weights: Path, bank: str) -> dict[str, Experts]:
    """The experts of every adapted linear in a weights file, as plain LoRA experts (see the module)."""
    try:
        with safe_open(weights, framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own error type, OSError or ValueError
        raise ValueError(f"{weights}: not a readable safetensors file: {error}") from None
    modules = sorted(key[: -len(ROUTER) - 1] for key in tensors if key.endswith("." + ROUTER))
    known = {f"{module}.{name}" for module in modules for name in (ROUTER, *BANKS[bank])}
    unknown = sorted(set(tensors) - known)
    if unknown:
        raise ValueError(
            f"{weights}: tensors comoe-vllm does not serve: {', '.join(unknown[:5])}; {ALTERNATIVE}"
        )
    experts = {}
    for module in modules:
        router = tensors[f"{module}.{ROUTER}"]
        try:
            lora_A, lora_B = _plain_experts(bank, module, tensors)
        except KeyError as error:
            raise ValueError(
                f"{weights}: {module} has a router but no {error} (expert_bank={bank!r})"
            ) from None
        n = router.shape[0]
        if lora_A.shape[0] != n or lora_B.shape[:2] != lora_A.shape[:2] or lora_A.shape[2] != router.shape[1]:
            raise ValueError(
                f"{weights}: {module}: router {tuple(router.shape)}, A {tuple(lora_A.shape)}, "
                f"B {tuple(lora_B.shape)} do not fit together"
            )
        experts[module] = Experts(router, lora_A.contiguous(), lora_B.contiguous())
    if not experts:
        raise ValueError(f"{weights}: no adapted linear (no '*.{ROUTER}' tensor)")
    return experts


def _plain_experts(bank: str, module: str, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    if bank == "hydra":  # one A shared by the n heads
        lora_B = tensors[f"{module}.lora_B"]
        lora_A = tensors[f"{module}.lora_A"]
        return lora_A.unsqueeze(0).expand(lora_B.shape[0], -1, -1), lora_B
    if bank == "omoe":
        lora_V = tensors[f"{module}.lora_V"]
        n, r, d_out = lora_V.shape
        return tensors[f"{module}.lora_A"], gram_schmidt_rows(lora_V.reshape(n * r, d_out)).view(n, r, d_out)
    return tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"]


def gram_schmidt_rows(vectors: torch.Tensor) -> torch.Tensor:
    """Rows of `vectors` [m, d] orthonormalised by Gram-Schmidt: QR of vectors.T with R's diagonal made
    positive, in float32 at least (comoe.moe.banks.gram_schmidt_rows, which OMoE's forward runs; the
    serving tests compare the two)."""
    work = vectors.to(torch.promote_types(vectors.dtype, torch.float32))
    q, r = torch.linalg.qr(work.t(), mode="reduced")
    signs = torch.where(r.diagonal() < 0, -1.0, 1.0).to(q.dtype)
    return (q * signs).t().to(vectors.dtype)


def fingerprint(path: Path) -> str:
    """sha256 of the folder's adapter_config.json and weights file, bytes: equal only for the same adapter."""
    digest = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        with open(path / name, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):  # noqa: B023
                digest.update(chunk)
    return digest.hexdigest()
