"""The layer's Gram-matrix contrastive losses against the reference definitions on materialised outputs."""

import dataclasses

import pytest
import torch
from torch import nn

from comoe.adapter.layer import ComoeContext, ComoeLinear
from comoe.config import ComoeConfig
from comoe.objectives.auxiliary import contrastive_loss
from comoe.objectives.reference import comoe_loss, moelora_loss


def layer_and_step(n, k, dtype, contrastive, mask, seed=0, zero_experts=(), **config_fields):
    torch.manual_seed(seed)
    context = ComoeContext()
    config = ComoeConfig(
        num_experts=n, top_k=k, r=8, lora_dropout=0.0, contrastive=contrastive, **config_fields
    )
    layer = ComoeLinear(nn.Linear(24, 32).to(dtype), config, context)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.lora_B[list(zero_experts)] = 0  # experts still at their initialisation: no output
    x = torch.randn(40, 24, dtype=dtype, requires_grad=True)
    context.keep_records = True
    layer(x)
    layer.record = dataclasses.replace(layer.record, mask=mask)  # the model attaches its stream's mask
    return layer, config, x


def materialised(layer):
    return torch.einsum("tnr,nro->tno", layer.record.z.float(), layer.lora_B.float()) * layer.scaling


def output_floor(layer, x, config):
    """The reference's per-token floor, computed independently: a fraction of |W0 x|."""
    with torch.no_grad():
        return config.contrastive_norm_floor * layer.base_layer(x).float().norm(dim=-1)


def assert_same_value_and_gradients(fast, reference, inputs, rtol, atol):
    torch.testing.assert_close(fast.float(), reference.float(), rtol=rtol, atol=atol)
    for a, b in zip(
        torch.autograd.grad(fast, inputs, retain_graph=True),
        torch.autograd.grad(reference, inputs),
        strict=True,
    ):
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol)


def padding_mask(seed=3):
    mask = torch.rand(40, generator=torch.Generator().manual_seed(seed)) > 0.3
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k"), [(2, 2), (4, 2), (4, 3), (8, 2), (8, 3)])
@pytest.mark.parametrize("anchor", ["all", "random"])
@pytest.mark.parametrize("zero_experts", [(), (0,)])
def test_comoe_gram_path_equals_reference(n, k, dtype, anchor, zero_experts):
    mask = padding_mask()
    layer, config, x = layer_and_step(n, k, dtype, "comoe", mask, anchor=anchor, zero_experts=zero_experts)
    inputs = [x, layer.lora_A, layer.lora_B]
    torch.manual_seed(11)
    fast = contrastive_loss(layer.record, config)
    torch.manual_seed(11)
    floor = output_floor(layer, x, config)
    reference = comoe_loss(
        materialised(layer), layer.record.routing.indices, config.temperature, anchor, mask, norm_floor=floor
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_same_value_and_gradients(fast, reference, inputs, tol, tol)


def test_comoe_sampled_negatives_equal_reference():
    mask = padding_mask()
    layer, config, x = layer_and_step(8, 2, torch.float32, "comoe", mask, num_negatives=3)
    torch.manual_seed(5)
    fast = contrastive_loss(layer.record, config)
    torch.manual_seed(5)
    reference = comoe_loss(
        materialised(layer),
        layer.record.routing.indices,
        config.temperature,
        mask=mask,
        num_negatives=3,
        norm_floor=output_floor(layer, x, config),
    )
    assert_same_value_and_gradients(fast, reference, [x, layer.lora_A, layer.lora_B], 1e-5, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k", "max_tokens"), [(2, 2, 256), (4, 2, 16), (8, 3, 256), (8, 2, 10)])
@pytest.mark.parametrize("zero_experts", [(), (0, 1)])
def test_moelora_gram_path_equals_reference(n, k, max_tokens, dtype, zero_experts):
    mask = padding_mask()
    layer, config, x = layer_and_step(
        n, k, dtype, "moelora", mask, contrastive_max_tokens=max_tokens, zero_experts=zero_experts
    )
    torch.manual_seed(7)
    fast = contrastive_loss(layer.record, config)
    torch.manual_seed(7)
    reference = moelora_loss(
        materialised(layer),
        layer.record.routing.indices,
        config.temperature,
        mask,
        max_tokens=max_tokens,
        norm_floor=output_floor(layer, x, config),
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_same_value_and_gradients(fast, reference, [x, layer.lora_A, layer.lora_B], tol, tol)


@pytest.mark.parametrize("contrastive", ["comoe", "moelora"])
def test_router_gets_no_gradient_from_contrastive_losses(contrastive):
    """Both objectives see routing only through the discrete top-k set, in the fast path and the reference."""
    layer, config, _ = layer_and_step(4, 2, torch.float32, contrastive, None)
    fast = contrastive_loss(layer.record, config)
    # z and the router's logits come from one autograd node (moe/fused.py): keep it for the second grad
    assert torch.autograd.grad(fast, layer.router.weight, allow_unused=True, retain_graph=True)[0] is None
    reference = comoe_loss(materialised(layer), layer.record.routing.indices, config.temperature)
    assert torch.autograd.grad(reference, layer.router.weight, allow_unused=True)[0] is None


@pytest.mark.parametrize("contrastive", ["comoe", "moelora"])
def test_a_zero_floor_is_the_plain_cosine(contrastive):
    """contrastive_norm_floor = 0 reproduces the unfloored objective (the paper's cosine) exactly."""
    layer, config, x = layer_and_step(4, 2, torch.float32, contrastive, None, contrastive_norm_floor=0.0)
    assert layer.record.norm_floor is None
    torch.manual_seed(3)
    fast = contrastive_loss(layer.record, config)
    torch.manual_seed(3)
    loss = comoe_loss if contrastive == "comoe" else moelora_loss
    reference = loss(materialised(layer), layer.record.routing.indices, config.temperature)
    assert_same_value_and_gradients(fast, reference, [x, layer.lora_A, layer.lora_B], 1e-5, 1e-5)


def test_one_hot_by_scatter_equals_f_one_hot_and_reads_nothing_on_the_host():
    from torch.utils._python_dispatch import TorchDispatchMode

    from comoe.objectives.balance import load_balance_loss
    from comoe.objectives.gram import one_hot

    class Syncs(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Syncs.count += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    indices = torch.tensor([[0, 3], [2, 1], [3, 0]])
    torch.testing.assert_close(
        one_hot(indices, 5, torch.float32), torch.nn.functional.one_hot(indices, 5).float()
    )
    probs = torch.softmax(torch.randn(3, 5), -1)
    with Syncs():
        one_hot(indices, 5, torch.float32)
        load_balance_loss(probs, indices, torch.tensor([True, False, True]))
    assert Syncs.count == 0
    with Syncs():
        torch.nn.functional.one_hot(indices, 5)
    assert Syncs.count > 0  # what the scatter avoids: F.one_hot checks the range on the host
