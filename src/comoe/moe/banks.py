"""Expert banks: how the n experts of an adapted linear are parameterised (PEFT's `LoraVariant` idea).

A bank is a stateless class that says which parameters a layer holds for its experts (names and shapes,
which are also the adapter file's tensor names under the layer's path), how they are initialised, and how
the layer turns its input into the experts' down-projections `z [T, n, r]` and reads their up-projections
`B [n, r, d_out]`. Everything after that -- routing, the mix strategies, the Gram-path objectives,
analysis -- reads only `z` and `B`, so an architecture variant is one class and one `register_bank` call,
chosen with `ComoeConfig.expert_bank`: `lora` (independent LoRA experts, the default) and `hydra`
(HydraLoRA's one shared A and n B heads) and `omoe` (OMoE's experts with mutually orthogonal outputs)
are built in. A bank whose experts' outputs are not `s * B_i^T z_i` (`dora`: DoRA experts, which rescale
the base output W0 x too) says so with `outputs_are_lora = False` and computes the routed output itself
(`routed_output`); the layer then records every expert's materialised output for the objectives.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from comoe.moe.experts import mix
from comoe.moe.routing import Routing
from comoe.plugins import Registry

Shape = tuple[int, ...]


class ExpertBank:
    """The experts' parameters of one layer. Subclasses set `name` and implement the four methods."""

    name: ClassVar[str]
    # Whether expert i's output is scaling * B_i^T z_i (z from down_project, B from up_weight): then the layer
    # mixes through a mix strategy and the contrastive objectives take cosines from Gram matrices of B. A bank
    # whose outputs are anything else sets it False and implements `routed_output`.
    outputs_are_lora: ClassVar[bool] = True

    @classmethod
    def shapes(
        cls, num_experts: int, r: int, in_features: int, out_features: int
    ) -> dict[str, tuple[int, ...]]:
        """Parameter name -> shape; the names become attributes of the layer and adapter-file keys."""
        raise NotImplementedError

    @classmethod
    def reset_parameters(cls, layer: nn.Module) -> None:
        """Initialise the layer's expert parameters so that its experts' outputs are exactly zero."""
        raise NotImplementedError

    @classmethod
    def down_project(cls, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """z[t, i] = A_i x_t: [T, d_in] -> [T, n, r], every expert for every token."""
        raise NotImplementedError

    @classmethod
    def up_weight(cls, layer: nn.Module) -> torch.Tensor:
        """The experts' up-projections as [n, r, d_out] (a view where possible; gradients flow through)."""
        raise NotImplementedError

    @classmethod
    def down_weight(cls, layer: nn.Module) -> torch.Tensor | None:
        """The down-projections as one matrix W [n*r, d_in] with down_project(x) = (x W^T).view(T, n, r),
        for banks where that holds: the layer then computes routing, down- and up-projection in one
        autograd Function (comoe.moe.fused). None (the default): down_project is called."""
        return None

    @classmethod
    def routed_output(
        cls,
        layer: nn.Module,
        x: torch.Tensor,
        z: torch.Tensor,
        routing: Routing,
        base_output: torch.Tensor,
        materialise: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Only for banks with `outputs_are_lora = False`, called by the layer instead of the mix strategy:
        (the gate-weighted sum of the active experts' outputs [T, d_out], every expert's output on every
        token [T, n, d_out] when `materialise` else None). `x` [T, d_in] is the experts' (dropped-out)
        input, `z` = down_project(layer, x), `base_output` [T, d_out] the base layer's output W0 x + b on the
        input before dropout (the base model's dtype)."""
        raise NotImplementedError(f"expert bank {cls.name!r} mixes through the mix strategies")

    @classmethod
    def num_parameters(cls, num_experts: int, r: int, in_features: int, out_features: int) -> int:
        """Trainable parameters of the experts of one layer (the router's n * d_in not included)."""
        return sum(
            math.prod(shape) for shape in cls.shapes(num_experts, r, in_features, out_features).values()
        )

    @classmethod
    def create(cls, layer: nn.Module, num_experts: int, r: int, factory: dict) -> None:
        """Register the parameters on `layer` (empty, on factory's device and dtype), then initialise them."""
        shapes = cls.shapes(num_experts, r, layer.in_features, layer.out_features)
        for name, shape in shapes.items():
            layer.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
        cls.reset_parameters(layer)


class LoraExperts(ExpertBank):
    """n independent LoRAs: A stored [n, r, d_in] (PEFT's lora_A.weight per expert, Kaiming-uniform with
    a = sqrt(5) as PEFT initialises it), B stored [n, r, d_out] (the transpose of PEFT's lora_B.weight, so
    the mix strategies use it without a copy), zero-initialised. CoMoE (arXiv 2505.17553) and MoELoRA
    (arXiv 2402.12851) experts."""

    name = "lora"

    @classmethod
    def shapes(
        cls, num_experts: int, r: int, in_features: int, out_features: int
    ) -> dict[str, tuple[int, ...]]:
        return {"lora_A": (num_experts, r, in_features), "lora_B": (num_experts, r, out_features)}

    @classmethod
    def reset_parameters(cls, layer: nn.Module) -> None:
        with torch.no_grad():
            for expert in layer.lora_A:
                nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
            layer.lora_B.zero_()

    @classmethod
    def down_project(cls, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        n, r, _ = layer.lora_A.shape
        return (x @ cls.down_weight(layer).t()).view(-1, n, r)

    @classmethod
    def down_weight(cls, layer: nn.Module) -> torch.Tensor:
        n, r, d_in = layer.lora_A.shape
        return layer.lora_A.view(n * r, d_in)

    @classmethod
    def up_weight(cls, layer: nn.Module) -> torch.Tensor:
        return layer.lora_B


class HydraExperts(ExpertBank):
    """HydraLoRA (Tian et al., NeurIPS 2024, arXiv 2404.19245): one down-projection A [r, d_in] shared by
    every expert and n up-projection heads B [n, r, d_out], so expert i is B_i A. Initialised as the
    paper's code initialises its layers (A Kaiming-uniform with a = sqrt(5), every head zero), so the
    experts' outputs start at exactly zero. `down_project` returns the one z = A x as an [T, n, r] view
    (expanded, no copy): the mix strategies and the Gram-path objectives read it as n experts whose
    down-projections happen to coincide. Trainable parameters: r * d_in + n * r * d_out."""

    name = "hydra"

    @classmethod
    def shapes(
        cls, num_experts: int, r: int, in_features: int, out_features: int
    ) -> dict[str, tuple[int, ...]]:
        return {"lora_A": (r, in_features), "lora_B": (num_experts, r, out_features)}

    @classmethod
    def reset_parameters(cls, layer: nn.Module) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))
            layer.lora_B.zero_()

    @classmethod
    def down_project(cls, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return (x @ layer.lora_A.t()).unsqueeze(1).expand(-1, layer.lora_B.shape[0], -1)

    @classmethod
    def up_weight(cls, layer: nn.Module) -> torch.Tensor:
        return layer.lora_B


def gram_schmidt_rows(vectors: torch.Tensor) -> torch.Tensor:
    """The rows of `vectors` [m, d] (m <= d, full row rank) orthonormalised by Gram-Schmidt, in order: the
    Q factor of the QR decomposition of vectors.T with R's diagonal made positive, which is exactly what
    the Gram-Schmidt process returns (tests/moe/test_banks.py checks it against the plain loop in values
    and gradients). Computed in float32 at least (torch's QR has no bfloat16 or float16 kernel)."""
    work = vectors.to(torch.promote_types(vectors.dtype, torch.float32))
    q, r = torch.linalg.qr(work.t(), mode="reduced")  # [d, m], [m, m]
    signs = torch.where(r.diagonal() < 0, -1.0, 1.0).to(q.dtype)
    return (q * signs).t().to(vectors.dtype)


class OrthogonalExperts(ExpertBank):
    """OMoE (Feng et al. 2025, arXiv 2501.10062): experts whose outputs are mutually orthogonal, by a
    Gram-Schmidt process onto the Stiefel manifold. Our reading (docs/methods/omoe.md): the n * r rows of
    the experts' up-projections are orthonormalised together, B = GramSchmidt(V) with V [n, r, d_out] the
    trained parameter, so B B^T = I: expert i's outputs B_i^T z_i lie in a subspace orthogonal to every
    other expert's, for every token and every routing, and the learning objective is unchanged. A [n, r,
    d_in] is zero-initialised (B cannot be: it is orthonormal), so the experts' outputs start at exactly
    zero; V starts Kaiming-uniform (a = sqrt(5)), full rank almost surely. Needs n * r <= d_out.
    Parameters and file keys: lora_A [n, r, d_in], lora_V [n, r, d_out] (B before orthonormalisation)."""

    name = "omoe"

    @classmethod
    def shapes(
        cls, num_experts: int, r: int, in_features: int, out_features: int
    ) -> dict[str, tuple[int, ...]]:
        if num_experts * r > out_features:
            raise ValueError(
                f"expert_bank='omoe' orthonormalises num_experts * r = {num_experts} * {r} = "
                f"{num_experts * r} rows in an output space of {out_features} dimensions: it needs "
                f"num_experts * r <= {out_features} (lower r or num_experts, or leave this linear out of "
                "target_modules)"
            )
        return {"lora_A": (num_experts, r, in_features), "lora_V": (num_experts, r, out_features)}

    @classmethod
    def reset_parameters(cls, layer: nn.Module) -> None:
        with torch.no_grad():
            layer.lora_A.zero_()
            for expert in layer.lora_V:
                nn.init.kaiming_uniform_(expert, a=math.sqrt(5))

    @classmethod
    def down_project(cls, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return LoraExperts.down_project(layer, x)

    @classmethod
    def down_weight(cls, layer: nn.Module) -> torch.Tensor:
        return LoraExperts.down_weight(layer)

    @classmethod
    def up_weight(cls, layer: nn.Module) -> torch.Tensor:
        n, r, d_out = layer.lora_V.shape
        return gram_schmidt_rows(layer.lora_V.reshape(n * r, d_out)).view(n, r, d_out)


def squared_row_norms(weight: torch.Tensor) -> torch.Tensor:
    """||W_j||^2 for every row j of `weight` [d_out, d_in] -> [d_out], in float32 at least."""
    weight = weight.to(torch.promote_types(weight.dtype, torch.float32))
    return (weight * weight).sum(-1)


def dora_weight_norms(
    base_weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """DoRA's column norms ||W0 + s B_i A_i||_c of every expert (Liu et al. 2024, arXiv 2402.09353, eq. 5),
    [n, d_out]: the norm of each output row of the torch [d_out, d_in] weight, without materialising the n
    adapted weights. Row j of expert i, with W0 [d_out, d_in], A [n, r, d_in], B stored [n, r, d_out]:

        ||W0_j||^2 + 2 s sum_k B_i[k, j] (A_i W0^T)[k, j] + s^2 B_i[:, j]^T (A_i A_i^T) B_i[:, j]

    (A_i W0^T [r, d_out] and A_i A_i^T [r, r] are the only products), clamped at 0 against rounding, square
    root. Computed in float32 at least; differentiable, though DoRA treats it as a constant (the caller
    detaches it). With B = 0 it is exactly `sqrt(||W0_j||^2)`, what `reset_parameters` sets m to."""
    dtype = torch.promote_types(base_weight.dtype, torch.float32)
    weight, down, up = base_weight.to(dtype), lora_A.to(dtype), lora_B.to(dtype)
    base = squared_row_norms(weight)  # [d_out]
    cross = (up * (down @ weight.t())).sum(1)  # [n, d_out]
    lora = ((down @ down.transpose(1, 2) @ up) * up).sum(1)  # [n, d_out]
    return (base + 2 * scaling * cross + scaling * scaling * lora).clamp_min(0).sqrt()


class DoraExperts(ExpertBank):
    """n DoRA experts (Liu et al. 2024, arXiv 2402.09353) over one frozen base weight W0, as CoMoE's Table 2
    applies its objective to them (arXiv 2505.17553). Expert i's adapted weight is W_i' = m_i (W0 + s B_i
    A_i) / ||W0 + s B_i A_i||_c (row norms of the [d_out, d_in] weight: DoRA's column norms), so its output
    beside the base layer's is

        E_i(x) = W_i' x - W0 x = (m_i / n_i - 1) * W0 x + (m_i / n_i) * s B_i A_i x,
        n_i = ||W0 + s B_i A_i||_c

    and the layer returns W0 x + b + sum_{i active} g_i E_i(x). n_i is detached (no gradient), as the paper's
    section 4.3 suggests and PEFT does; it comes from `dora_weight_norms` without materialising W0 + s B_i
    A_i. Parameters and file keys: lora_A [n, r, d_in] (Kaiming-uniform, a = sqrt(5)), lora_B [n, r, d_out]
    (zero), lora_magnitude_vector [n, d_out] (PEFT's name; each expert's m, initialised to ||W0||_c), so
    E_i = 0 exactly at initialisation. Under dropout the experts' whole term sees the dropped-out input,
    W0 x included, as PEFT's DoRA computes it. The layer's base must expose W0 (`layer.base_weight()`: a
    float nn.Linear or Conv1D weight; quantized bases are refused there)."""

    name = "dora"
    outputs_are_lora = False

    @classmethod
    def shapes(
        cls, num_experts: int, r: int, in_features: int, out_features: int
    ) -> dict[str, tuple[int, ...]]:
        return {
            **LoraExperts.shapes(num_experts, r, in_features, out_features),
            "lora_magnitude_vector": (num_experts, out_features),
        }

    @classmethod
    def reset_parameters(cls, layer: nn.Module) -> None:
        LoraExperts.reset_parameters(layer)
        with torch.no_grad():
            norms = squared_row_norms(layer.base_weight()).sqrt()  # dora_weight_norms' value at B = 0
            layer.lora_magnitude_vector.copy_(norms.expand_as(layer.lora_magnitude_vector))

    @classmethod
    def down_project(cls, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return LoraExperts.down_project(layer, x)

    @classmethod
    def up_weight(cls, layer: nn.Module) -> torch.Tensor:
        return layer.lora_B

    @classmethod
    def magnitude_scale(cls, layer: nn.Module) -> torch.Tensor:
        """m_i / n_i [n, d_out], the norm detached and rounded to m's dtype first (so the scale is exactly 1
        while B = 0 and m is untrained, in any adapter dtype)."""
        with torch.no_grad():
            norms = dora_weight_norms(layer.base_weight(), layer.lora_A, layer.lora_B, layer.scaling)
        magnitude = layer.lora_magnitude_vector
        return magnitude / norms.to(magnitude.dtype)

    @classmethod
    def routed_output(
        cls,
        layer: nn.Module,
        x: torch.Tensor,
        z: torch.Tensor,
        routing: Routing,
        base_output: torch.Tensor,
        materialise: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        scale = cls.magnitude_scale(layer)  # [n, d_out]
        weight = layer.base_weight()
        if layer.training and isinstance(layer.lora_dropout, nn.Dropout):  # W0 of the dropped-out input
            base = torch.nn.functional.linear(x.to(weight.dtype), weight).to(x.dtype)
        else:  # the base layer's own product, its bias removed
            base = base_output.to(x.dtype)
            bias = getattr(layer.base_layer, "bias", None)
            if bias is not None:
                base = base - bias.to(x.dtype)
        gates = routing.dense_gates().to(x.dtype)  # [T, n], zero for inactive experts
        if materialise:
            lora = torch.einsum("tnr,nro->tno", z, layer.lora_B) * layer.scaling
            outputs = (scale - 1) * base.unsqueeze(1) + scale * lora  # [T, n, d_out]
            return torch.einsum("tn,tno->to", gates, outputs), outputs
        # sum_i g_i (m_i/n_i - 1) W0 x  +  the mix of LoRA experts whose B_i columns are scaled by m_i/n_i
        scaled = layer.lora_B * scale.unsqueeze(1)
        delta = mix(z, routing, scaled, layer.scaling, layer.expert_compute)
        return delta + (gates @ (scale - 1)) * base, None


BANKS: Registry = Registry("expert_bank", "expert bank")  # name -> ExpertBank subclass
register_bank = BANKS.register
unregister_bank = BANKS.unregister
get_bank = BANKS.lookup  # ValueError naming the registered banks when `name` is not one


def ffn_bank(name: str) -> type[ExpertBank]:
    """The registered expert bank `name` for FFN-block experts (`ffn_experts`), whose three projections add
    their experts' LoRA updates B_i A_i h to the frozen MLP's: a bank that computes its routed output
    itself (`outputs_are_lora = False`, e.g. 'dora', whose experts rescale the base weight) has no such
    update. Raises ValueError naming the bank and the registered banks that work (an unregistered name:
    get_bank's ValueError)."""
    bank = get_bank(name)
    if not bank.outputs_are_lora:
        usable = [entry for entry, bank_class in BANKS.items() if bank_class.outputs_are_lora]
        raise ValueError(
            f"expert_bank={name!r} with ffn_experts: FFN-block experts add LoRA updates B_i A_i h to the "
            f"frozen MLP's projections, and {name!r} experts are not of that form; valid with ffn_experts: "
            f"{', '.join(usable)} (or leave ffn_experts null for {name!r} experts on each linear)"
        )
    return bank


register_bank(LoraExperts)
register_bank(HydraExperts)
register_bank(OrthogonalExperts)
register_bank(DoraExperts)
