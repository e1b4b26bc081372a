"""CoMoE's InfoNCE in one autograd Function (z and Gram matrices in, hand-derived backward) against the
reference on materialised expert outputs and against the autograd Gram path, in value and gradients."""

import pytest
import torch

from comoe.config import ComoeConfig
from comoe.moe.experts import expert_grams
from comoe.moe.record import LayerRecord
from comoe.moe.routing import Routing
from comoe.objectives import contrastive
from comoe.objectives.contrastive import comoe_batched
from comoe.objectives.gram import anchor_cosines
from comoe.objectives.gram_infonce import GramComoeInfoNCE, gram_comoe_loss
from comoe.objectives.infonce import comoe_loss_from_anchor_cosines
from comoe.objectives.reference import comoe_loss
from comoe.objectives.triton_infonce import every_anchor_and_negative


def experts(lead, tokens, n, k, seed, dtype=torch.float64, r=3, d=7, zero_experts=()):
    """z [..., T, n, r] and B [..., n, r, d] (leaves), top-k indices [..., T, k], a mask and a floor [..., T]."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*lead, tokens, n, r, generator=g, dtype=torch.float64)
    lora_B = torch.randn(*lead, n, r, d, generator=g, dtype=torch.float64)
    lora_B[..., list(zero_experts), :, :] = 0  # experts at their initialisation: no output, clamped norms
    indices = torch.randn(*lead, tokens, n, generator=g).topk(k, dim=-1).indices
    mask = torch.rand(*lead, tokens, generator=g) > 0.3
    floor = torch.rand(*lead, tokens, generator=g, dtype=torch.float64) * 2
    return z.to(dtype).requires_grad_(), lora_B.to(dtype).requires_grad_(), indices, mask, floor


def grams(lora_B):
    flat = lora_B.flatten(-3, -2)
    return flat @ flat.transpose(-1, -2)


# n, k: k = n has no negatives; n not a power of two
@pytest.mark.parametrize(("n", "k"), [(4, 2), (5, 3), (8, 2), (3, 3), (2, 2)])
@pytest.mark.parametrize("with_floor", [False, True])
@pytest.mark.parametrize("zero_experts", [(), (0,)])
def test_equals_the_reference_on_materialised_outputs(n, k, with_floor, zero_experts):
    z, lora_B, indices, mask, floor = experts((), 23, n, k, seed=n * 10 + k, zero_experts=zero_experts)
    floor = floor if with_floor else None
    fast = gram_comoe_loss(z, indices, grams(lora_B), 0.3, mask, floor)
    outputs = torch.einsum("tir,ird->tid", z, lora_B)  # scaling 1: z-space is output space
    reference = comoe_loss(outputs, indices, 0.3, "all", mask, norm_floor=floor)
    torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-12)
    assert fast.shape == () and (fast > 0 if k < n else fast == 0)
    for a, b in zip(
        torch.autograd.grad(fast, (z, lora_B), retain_graph=True),
        torch.autograd.grad(reference, (z, lora_B)),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_stacked_layers_equal_the_autograd_gram_path_per_layer():
    """[L, ...] inputs: each layer's loss and every gradient equal to the autograd path (anchor_cosines
    then comoe_loss_from_anchor_cosines) on that layer, with different weights per layer (backward's
    per-layer scale)."""
    z, lora_B, indices, mask, floor = experts((3,), 17, 6, 2, seed=5, dtype=torch.float32)
    weights = torch.tensor([0.5, -1.0, 2.0])
    fast = gram_comoe_loss(z, indices, expert_grams(lora_B), 0.5, mask, floor)
    reference = comoe_loss_from_anchor_cosines(
        anchor_cosines(z, indices, expert_grams(lora_B), floor), indices, 0.5, "all", mask, check=False
    )
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad((fast * weights).sum(), (z, lora_B))
    expected = torch.autograd.grad((reference * weights).sum(), (z, lora_B))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_gradcheck_in_float64():
    z, lora_B, indices, mask, floor = experts((2,), 6, 4, 2, seed=1, r=2, d=5)
    gram = grams(lora_B).detach().requires_grad_()
    weights = (mask / mask.sum(-1, keepdim=True) / 2).unsqueeze(-1)  # [L, T, 1]: each of k = 2 anchors
    for with_floor in (None, floor * 0.3):  # a floor below some norms and above others
        torch.autograd.gradcheck(
            lambda z, gram, f=with_floor: GramComoeInfoNCE.apply(z, gram, indices, weights, None, f, 0.7),
            (z, gram),
        )


def test_bfloat16_z_under_autocast_is_the_float32_loss():
    """bf16 down-projections (torch.autocast) are computed in float32 inside the Function; z's gradient
    comes back in bf16."""
    z, lora_B, indices, mask, floor = experts((2,), 16, 4, 2, seed=2, dtype=torch.float32)
    gram = expert_grams(lora_B)
    half = z.detach().to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = gram_comoe_loss(half, indices, gram, 0.5, mask, floor)
    full = gram_comoe_loss(half.detach().float().requires_grad_(), indices, gram, 0.5, mask, floor)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full)
    (grad,) = torch.autograd.grad(low.sum(), half)
    assert grad.dtype == torch.bfloat16


def test_padding_tokens_take_no_part():
    """Masked tokens may hold any indices (here out of range) and any z: neither changes the loss."""
    z, lora_B, indices, mask, floor = experts((), 12, 5, 2, seed=3)
    gram = grams(lora_B)
    loss = gram_comoe_loss(z, indices, gram, 0.5, mask, floor)
    junk_indices = torch.where(mask.unsqueeze(-1), indices, 99)
    junk_z = torch.where(mask[:, None, None], z, 1e3)
    torch.testing.assert_close(gram_comoe_loss(junk_z, junk_indices, gram, 0.5, mask, floor), loss)
    (grad,) = torch.autograd.grad(loss, z)
    assert grad[~mask].abs().max() == 0 and grad[mask].abs().max() > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(k=1), "k <= n"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(gram_size=5), "disagree"),
    ],
)
def test_bad_arguments_are_errors(kwargs, message):
    k, size = kwargs.get("k", 2), kwargs.get("gram_size", 12)
    z = torch.randn(8, 4, 3)
    indices = torch.randn(8, 4).topk(k, dim=-1).indices
    with pytest.raises(ValueError, match=message):
        gram_comoe_loss(z, indices, torch.eye(size), kwargs.get("temperature", 0.5))


def test_which_settings_the_fused_paths_compute():
    assert every_anchor_and_negative("all", None, 4, 2) and every_anchor_and_negative("all", 2, 4, 2)
    assert not every_anchor_and_negative("random", None, 4, 2)  # one random anchor per token
    assert not every_anchor_and_negative("all", 1, 4, 2)  # sampled negatives
    assert not every_anchor_and_negative("all", None, 4, 1)  # no positive


def test_the_comoe_objective_takes_it_in_every_setting(monkeypatch):
    """comoe_batched calls gram_comoe_loss (off CUDA) for every anchor and negative setting; each equals
    the autograd Gram path (anchor_cosines, then comoe_loss_from_anchor_cosines) on the stacked records with
    the same draws (the global generator seeded alike), in value and in z's and B's gradients."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return gram_comoe_loss(*args, **kwargs)

    monkeypatch.setattr(contrastive, "gram_comoe_loss", counted)
    records = []
    for seed in range(2):
        z, lora_B, indices, mask, floor = experts((), 11, 6, 2, seed=seed, dtype=torch.float32)
        probs = torch.rand(11, 6)
        routing = Routing(probs, indices, probs.gather(1, indices))
        records.append(LayerRecord(routing, z, mask, lora_B, base_norm=floor.float()))
    leaves = [leaf for record in records for leaf in (record.z, record.lora_B)]
    stack = [torch.stack([getattr(r, name) for r in records]) for name in ("z", "lora_B", "mask", "norm_floor")]
    z, lora_B, mask, floor = stack
    indices = torch.stack([record.routing.indices for record in records])
    settings = [dict(), dict(anchor="random"), dict(num_negatives=2), dict(anchor="random", num_negatives=1)]
    for number, fields in enumerate(settings, start=1):
        config = ComoeConfig(num_experts=6, top_k=2, contrastive="comoe", **fields)
        torch.manual_seed(number)
        fused = comoe_batched(records, config)
        assert len(calls) == number
        torch.manual_seed(number)
        rows = anchor_cosines(z, indices, expert_grams(lora_B), floor)
        expected = comoe_loss_from_anchor_cosines(
            rows, indices, config.temperature, config.anchor, mask, num_negatives=config.num_negatives, check=False
        )
        torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)
        weights = torch.tensor([1.0, -0.5])
        got = torch.autograd.grad((fused * weights).sum(), leaves)
        want = torch.autograd.grad((expected * weights).sum(), leaves)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
