"""The fused CoMoE InfoNCE kernel in Triton's interpreter, on the CPU: value and gradients against the
reference on materialised expert outputs (comoe.objectives.reference.comoe_loss)."""

import pytest
import torch

from comoe.config import ComoeConfig
from comoe.moe import triton_jit
from comoe.moe.record import LayerRecord
from comoe.moe.routing import Routing
from comoe.moe.triton_jit import TRITON_AVAILABLE
from comoe.objectives import contrastive
from comoe.objectives.contrastive import comoe_batched, comoe_objective
from comoe.objectives.reference import comoe_loss
from comoe.objectives.triton_infonce import COMOE_INFONCE, fused_comoe_applies, fused_comoe_loss

pytestmark = [
    pytest.mark.skipif(not TRITON_AVAILABLE, reason="Triton is not installed (the 'triton' extra)"),
    pytest.mark.skipif(
        TRITON_AVAILABLE and not triton_jit.INTERPRETER and not torch.cuda.is_available(),
        reason="TRITON_INTERPRET=0 and no CUDA device: nowhere to run the kernels",
    ),
]
# The interpreter here (tests/conftest.py); on a GPU machine `TRITON_INTERPRET=0 pytest` runs the compiled
# kernel on CUDA tensors.
DEVICE = torch.device("cpu" if triton_jit.INTERPRETER or not torch.cuda.is_available() else "cuda")


def experts(lead, num_tokens, n, k, seed, dtype=torch.float32, r=4, d=12):
    """z [..., T, n, r], B [n, r, d] (leaves), top-k indices [..., T, k] of random scores."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*lead, num_tokens, n, r, generator=g).to(DEVICE, dtype).requires_grad_()
    lora_B = torch.randn(n, r, d, generator=g).to(DEVICE, dtype).requires_grad_()
    indices = torch.randn(*lead, num_tokens, n, generator=g).topk(k, dim=-1).indices.to(DEVICE)
    return z, lora_B, indices


def dots(z, lora_B, indices, dtype=torch.float32):
    """The anchors' dot products [..., T, k, n] and the squared norms [..., T, n] of e_i = B_i^T z_i,
    in float32 from the inputs as they are (the Gram path's z.float()), then cast to `dtype`."""
    outputs = torch.einsum("...ir,ird->...id", z.float(), lora_B.float())
    full = outputs @ outputs.transpose(-1, -2)  # [..., T, n, n]
    n = full.shape[-1]
    anchor = full.gather(-2, indices.unsqueeze(-1).expand(*indices.shape, n))
    return anchor.to(dtype), full.diagonal(dim1=-2, dim2=-1).to(dtype)


def test_the_kernel_runs_in_tritons_interpreter():
    if DEVICE.type == "cuda":
        pytest.skip("compiled for the GPU (TRITON_INTERPRET=0)")
    assert type(COMOE_INFONCE).__name__ == "InterpretedFunction"


# T, n, k: T not a multiple of the token block (8), n and k not powers of two; k = n has no negatives
@pytest.mark.parametrize(("num_tokens", "n", "k"), [(19, 6, 2), (13, 5, 3), (9, 8, 2), (7, 3, 3)])
@pytest.mark.parametrize("with_floor", [False, True])
def test_value_and_gradients_equal_the_reference(num_tokens, n, k, with_floor):
    z, lora_B, indices = experts((), num_tokens, n, k, seed=num_tokens)
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(num_tokens, generator=g) > 0.3).to(DEVICE)
    floor = (torch.rand(num_tokens, generator=g) * 3).to(DEVICE) if with_floor else None
    fused = fused_comoe_loss(*dots(z, lora_B, indices), indices, 0.2, mask, floor, block_t=8)
    outputs = torch.einsum("tir,ird->tid", z, lora_B)
    reference = comoe_loss(outputs, indices, 0.2, mask=mask, norm_floor=floor)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    if k == n:
        assert fused.item() == 0  # no negatives: every anchor's loss is log 1
    got = torch.autograd.grad(fused, (z, lora_B), allow_unused=True)
    expected = torch.autograd.grad(reference, (z, lora_B))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a if a is not None else torch.zeros_like(b), b, rtol=1e-4, atol=1e-6)


def test_floored_and_zero_outputs_match_the_reference_subgradients():
    """Experts with zero output (B = 0 rows) and norms below the floor: the clamps' subgradients."""
    z, lora_B, indices = experts((), 11, 5, 2, seed=2)
    with torch.no_grad():
        lora_B[3] = 0.0  # expert 3's output is zero for every token
    floor = torch.full((11,), 2.0, device=DEVICE)
    fused = fused_comoe_loss(*dots(z, lora_B, indices), indices, 0.5, None, floor)
    reference = comoe_loss(torch.einsum("tir,ird->tid", z, lora_B), indices, 0.5, norm_floor=floor)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    for a, b in zip(
        torch.autograd.grad(fused, (z, lora_B)), torch.autograd.grad(reference, (z, lora_B)), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_float16_inputs_and_dots():
    z, lora_B, indices = experts((), 17, 6, 2, seed=3, dtype=torch.float16)
    reference = comoe_loss(torch.einsum("tir,ird->tid", z, lora_B), indices, 0.2)
    expected = torch.autograd.grad(reference, (z, lora_B))
    # the reference materialises float16 outputs, the dots here come from float32 products: float16's
    # rounding (2^-11) apart, in the value and relative to the largest gradient
    for dtype in (torch.float32, torch.float16):  # dots in float32 as the Gram path's, and in float16
        fused = fused_comoe_loss(*dots(z, lora_B, indices, dtype), indices, 0.2)
        assert fused.dtype == torch.float32
        torch.testing.assert_close(fused, reference.float(), rtol=3e-3, atol=3e-3)
        for a, b in zip(torch.autograd.grad(fused, (z, lora_B)), expected, strict=True):
            assert a.dtype == torch.float16
            torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=3e-3 * b.abs().max().item())


def test_stacked_layers_give_one_loss_each():
    """Leading dimensions (layers of one shape stacked): each index's loss is its own layer's."""
    z, lora_B, indices = experts((3,), 10, 5, 2, seed=4)
    mask = (torch.rand(3, 10, generator=torch.Generator().manual_seed(5)) > 0.4).to(DEVICE)
    mask[2] = False  # a layer without real tokens: 0
    fused = fused_comoe_loss(*dots(z, lora_B, indices), indices, 0.3, mask)
    assert fused.shape == (3,)
    outputs = torch.einsum("ltir,ird->ltid", z, lora_B)
    for layer in range(3):
        reference = comoe_loss(outputs[layer], indices[layer], 0.3, mask=mask[layer])
        torch.testing.assert_close(fused[layer], reference, rtol=1e-5, atol=1e-6)
    assert fused[2].item() == 0


def test_where_the_fused_kernel_applies():
    assert fused_comoe_applies("cuda", "all", None, 8, 2)
    assert fused_comoe_applies("cuda", "all", 6, 8, 2)  # every inactive expert is sampled
    assert not fused_comoe_applies("cpu", "all", None, 8, 2)
    assert not fused_comoe_applies("cuda", "random", None, 8, 2)
    assert not fused_comoe_applies("cuda", "all", 3, 8, 2)
    assert not fused_comoe_applies("cuda", "all", None, 8, 1)


def test_bad_input_is_refused():
    z, lora_B, indices = experts((), 5, 4, 2, seed=6)
    anchor, self_dots = dots(z, lora_B, indices)
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        fused_comoe_loss(anchor, self_dots, indices, 0.0)
    with pytest.raises(ValueError, match="k >= 2"):
        fused_comoe_loss(anchor[:, :1], self_dots, indices[:, :1], 0.2)
    with pytest.raises(ValueError, match="disagree"):
        fused_comoe_loss(anchor, self_dots[:4], indices, 0.2)
    with pytest.raises(ValueError, match="block_t=12 must be a power of two"):
        fused_comoe_loss(anchor, self_dots, indices, 0.2, block_t=12)


def test_the_comoe_objective_takes_the_kernel_where_it_applies(monkeypatch):
    """The hook in comoe.objectives.contrastive (CUDA only): with the kernel made to apply here, the
    registered objective, per layer and batched over layers, equals its torch path in value and gradients."""
    g = torch.Generator().manual_seed(7)
    config = ComoeConfig(num_experts=5, top_k=2, r=4, temperature=0.3)
    records = []
    for _ in range(2):
        z, lora_B, indices = experts((), 9, 5, 2, seed=int(torch.randint(100, (1,), generator=g)))
        probs = torch.rand(9, 5, generator=g)
        routing = Routing(probs, indices, probs.gather(1, indices))
        mask = torch.rand(9, generator=g) > 0.3
        floor = torch.rand(9, generator=g)
        records.append(LayerRecord(routing, z, mask, lora_B, base_norm=floor))
    leaves = [leaf for record in records for leaf in (record.z, record.lora_B)]
    torch_path = [comoe_objective(records[0], config), comoe_batched(records, config)]
    calls = []

    def applies(*args):
        calls.append(args)
        return True

    monkeypatch.setattr(contrastive, "fused_comoe_applies", applies)
    fused = [comoe_objective(records[0], config), comoe_batched(records, config)]
    assert len(calls) == 2 and calls[0] == ("cpu", "all", None, 5, 2)
    for got, expected in zip(fused, torch_path, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        got_grads = torch.autograd.grad(got.sum(), leaves, allow_unused=True)
        expected_grads = torch.autograd.grad(expected.sum(), leaves, allow_unused=True)
        for a, b in zip(got_grads, expected_grads, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
