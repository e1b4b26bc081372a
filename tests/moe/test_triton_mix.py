"""The fused Triton mixture of LoRA experts (strategy 'triton') in Triton's interpreter, on the CPU: outputs
and gradients against the dense reference and the other strategies, float32 and float16."""

import pytest
import torch

from comoe.moe import triton_jit
from comoe.moe.experts import choose_strategy, mix_blocks, mix_grouped
from comoe.moe.routing import route
from comoe.moe.triton_jit import TRITON_AVAILABLE
from comoe.moe.triton_mix import MIX_BACKWARD_B, MIX_BACKWARD_Z, MIX_FORWARD, scatter_mix, triton_runs_on
from tests.helpers import dense_reference, grads, make_layer

pytestmark = [
    pytest.mark.skipif(not TRITON_AVAILABLE, reason="Triton is not installed (the 'triton' extra)"),
    pytest.mark.skipif(
        TRITON_AVAILABLE and not triton_jit.INTERPRETER and not torch.cuda.is_available(),
        reason="TRITON_INTERPRET=0 and no CUDA device: nowhere to run the kernels",
    ),
]
# The interpreter here (tests/conftest.py); on a GPU machine `TRITON_INTERPRET=0 pytest` runs the compiled
# kernels on CUDA tensors.
DEVICE = torch.device("cpu" if triton_jit.INTERPRETER or not torch.cuda.is_available() else "cuda")


def routed(num_tokens, n, k, generator, dtype=torch.float32, r=4, d_out=40):
    """z [T, n, r], B [n, r, d_out], router logits [T, n] (all leaves) and the routing of the logits."""
    z = torch.randn(num_tokens, n, r, generator=generator).to(DEVICE, dtype).requires_grad_()
    lora_B = torch.randn(n, r, d_out, generator=generator).to(DEVICE, dtype).requires_grad_()
    logits = torch.randn(num_tokens, n, generator=generator).to(DEVICE).requires_grad_()
    return z, lora_B, logits


def masked_dense(z, logits, lora_B, k, scaling):
    """Every expert for every token in float64, weighted by the top-k gates (renormalised for k > 1, the
    Switch Transformer's p for top-1, so the router gets a gradient), zero elsewhere."""
    probs = torch.softmax(logits.double(), dim=-1)
    top, idx = probs.topk(k, dim=-1)
    gates = torch.zeros_like(probs).scatter(1, idx, top / top.sum(-1, keepdim=True) if k > 1 else top)
    outs = torch.einsum("tnr,nro->tno", z.double(), lora_B.double()) * scaling
    return (outs * gates.unsqueeze(-1)).sum(1)


def test_the_kernels_run_in_tritons_interpreter():
    """tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported: the kernels are interpreted."""
    if DEVICE.type == "cuda":
        pytest.skip("compiled for the GPU (TRITON_INTERPRET=0)")
    assert triton_jit.INTERPRETER
    for kernel in (MIX_FORWARD, MIX_BACKWARD_Z, MIX_BACKWARD_B):
        assert type(kernel).__name__ == "InterpretedFunction"


# T, n, k, r, d_out: none a multiple of the blocks (16 pairs, 16 features); top-1, top-2, top-3, soft (k = n)
SHAPES = [(37, 4, 1, 4, 40), (29, 5, 2, 3, 17), (23, 6, 3, 8, 33), (11, 4, 4, 5, 21)]


# the interpreter has no bfloat16 (numpy); compiled on a GPU it is checked too
DTYPES = [(torch.float32, 1e-5), (torch.float16, 3e-3)] + [(torch.bfloat16, 2e-2)] * (DEVICE.type == "cuda")


@pytest.mark.parametrize(("dtype", "tol"), DTYPES)
@pytest.mark.parametrize(("num_tokens", "n", "k", "r", "d_out"), SHAPES)
def test_outputs_and_gradients_equal_the_masked_dense_reference(num_tokens, n, k, r, d_out, dtype, tol):
    z, lora_B, logits = routed(num_tokens, n, k, torch.Generator().manual_seed(n * k), dtype, r, d_out)
    routing = route(logits, k, soft=k == n, normalize=k > 1)
    out = scatter_mix(z, routing.gates, routing.indices, lora_B, 0.75, block_m=16, block_n=16)
    assert out.shape == (num_tokens, d_out) and out.dtype == dtype
    ref = masked_dense(z, logits, lora_B, k, 0.75)
    grad = torch.randn(num_tokens, d_out, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad = grad.to(DEVICE)
    got = torch.autograd.grad((out.double() * grad).sum(), (z, logits, lora_B))
    expected = torch.autograd.grad((ref * grad).sum(), (z, logits, lora_B))
    scale = ref.abs().max()
    torch.testing.assert_close(out.double() / scale, ref / scale, rtol=0, atol=tol)
    for fast, slow in zip(got, expected, strict=True):
        assert fast.dtype == slow.dtype or fast.dtype == dtype
        torch.testing.assert_close(fast.double() / slow.abs().max(), slow.double() / slow.abs().max(), rtol=0, atol=tol)


def mix_triton_small_blocks(z, routing, lora_B, scaling):
    return scatter_mix(z, routing.gates, routing.indices, lora_B, scaling, block_m=16, block_n=16)


@pytest.mark.parametrize("k", [1, 2])
def test_equals_the_blocks_and_grouped_strategies(k):
    z, lora_B, logits = routed(45, 6, k, torch.Generator().manual_seed(3), r=4, d_out=24)
    outputs, gradients = [], []
    for strategy in (mix_blocks, mix_grouped, mix_triton_small_blocks):
        out = strategy(z, route(logits, k, normalize=k > 1), lora_B, 2.0)
        outputs.append(out)
        gradients.append(torch.autograd.grad(out.square().sum(), (z, logits, lora_B)))
    for out, grad in zip(outputs[1:], gradients[1:], strict=True):
        torch.testing.assert_close(out, outputs[0], rtol=1e-5, atol=1e-5)
        for a, b in zip(grad, gradients[0], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_experts_without_tokens_get_exactly_zero_gradient():
    z, lora_B, logits = routed(30, 6, 2, torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits[:, 4:] = -30.0  # experts 4 and 5 are never chosen
    routing = route(logits, 2)
    out = scatter_mix(z, routing.gates, routing.indices, lora_B, 1.0, block_m=16, block_n=16)
    grad_z, grad_b = torch.autograd.grad(out.sum(), (z, lora_B))
    assert torch.equal(grad_b[4:], torch.zeros_like(grad_b[4:]))
    assert torch.equal(grad_z[:, 4:], torch.zeros_like(grad_z[:, 4:]))  # inactive (token, expert) pairs
    assert grad_b[:4].abs().sum() > 0


def test_expanded_z_as_a_shared_down_projection_gives_its_summed_gradient():
    """HydraLoRA's bank hands the strategies z as an expanded view (one shared A): the kernel reads z
    through its strides, and autograd sums the per-expert gradient back."""
    g = torch.Generator().manual_seed(5)
    shared = torch.randn(13, 1, 4, generator=g).to(DEVICE).requires_grad_()
    lora_B = torch.randn(3, 4, 18, generator=g).to(DEVICE).requires_grad_()
    routing = route(torch.randn(13, 3, generator=g).to(DEVICE), 3, soft=True)
    out = scatter_mix(shared.expand(13, 3, 4), routing.gates, routing.indices, lora_B, 1.0, block_m=16)
    ref = mix_blocks(shared.expand(13, 3, 4), routing, lora_B, 1.0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    got, expected = (torch.autograd.grad(o.sum(), (shared, lora_B)) for o in (out, ref))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("routing", ["topk", "soft"])
def test_a_layer_computing_through_triton_equals_the_dense_reference(routing):
    layer = make_layer(16, 24, 4, 2, 4, "triton", routing=routing).to(DEVICE)
    x = torch.randn(3, 5, 16, device=DEVICE, requires_grad=True)
    out, ref = layer(x), dense_reference(layer, x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for fast, slow in zip(grads(layer, x, out), grads(layer, x, ref), strict=True):
        torch.testing.assert_close(fast.double(), slow.double(), rtol=1e-4, atol=1e-5)


def test_auto_chooses_triton_on_cuda_only():
    assert choose_strategy("auto", 8, 2, "cpu") == "blocks"
    assert choose_strategy("auto", 8, 2, "cuda") == "triton"
    assert choose_strategy("triton", 8, 2, "cpu") == "triton"
    assert triton_runs_on("cuda") and not triton_runs_on("cpu")


def test_bad_input_is_refused(monkeypatch):
    z, lora_B, logits = routed(5, 3, 2, torch.Generator().manual_seed(6))
    routing = route(logits, 2)
    with pytest.raises(ValueError, match="block_m=24 must be a power of two >= 16"):
        scatter_mix(z, routing.gates, routing.indices, lora_B, 1.0, block_m=24)
    with pytest.raises(ValueError, match="dtype"):
        scatter_mix(z, routing.gates, routing.indices, lora_B.half(), 1.0)
    with pytest.raises(ValueError, match="disagree"):
        scatter_mix(z, routing.gates, routing.indices, lora_B[:2], 1.0)
    monkeypatch.setattr(triton_jit, "INTERPRETER", False)  # as on a machine without the interpreter
    with pytest.raises(ValueError, match="expert_compute='triton': Triton kernels run on CUDA tensors.*got tensors on 'cpu'"):
        scatter_mix(z.cpu(), routing.gates.cpu(), routing.indices.cpu(), lora_B.cpu(), 1.0)


def test_an_empty_batch_gives_an_empty_output_and_zero_gradients():
    z, lora_B, logits = routed(0, 4, 2, torch.Generator().manual_seed(7))
    routing = route(logits, 2)
    out = scatter_mix(z, routing.gates, routing.indices, lora_B, 1.0)
    assert out.shape == (0, 40)
    (grad_b,) = torch.autograd.grad(out.sum(), (lora_B,))
    assert torch.equal(grad_b, torch.zeros_like(lora_B))
