"""The layer's Gram-matrix contrastive losses against the reference definitions on materialised outputs."""

import pytest
import torch
from torch import nn

from comoe.adapter.layer import ComoeContext, ComoeLinear
from comoe.config import ComoeConfig
from comoe.objectives.auxiliary import contrastive_loss
from comoe.objectives.reference import comoe_loss, moelora_loss


def layer_and_step(n, k, dtype, contrastive, mask, seed=0, **config_fields):
    torch.manual_seed(seed)
    context = ComoeContext()
    config = ComoeConfig(
        num_experts=n, top_k=k, r=8, lora_dropout=0.0, contrastive=contrastive, **config_fields
    )
    layer = ComoeLinear(nn.Linear(24, 32).to(dtype), config, context)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
    x = torch.randn(40, 24, dtype=dtype, requires_grad=True)
    context.keep_records, context.token_mask = True, mask
    layer(x)
    return layer, config, x


def materialised(layer):
    return torch.einsum("tnr,nro->tno", layer.record.z.float(), layer.lora_B.float()) * layer.scaling


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
def test_comoe_gram_path_equals_reference(n, k, dtype, anchor):
    mask = padding_mask()
    layer, config, x = layer_and_step(n, k, dtype, "comoe", mask, anchor=anchor)
    inputs = [x, layer.lora_A, layer.lora_B]
    torch.manual_seed(11)
    fast = contrastive_loss(layer.record, config)
    torch.manual_seed(11)
    reference = comoe_loss(
        materialised(layer), layer.record.routing.indices, config.temperature, anchor, mask
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
        materialised(layer), layer.record.routing.indices, config.temperature, mask=mask, num_negatives=3
    )
    assert_same_value_and_gradients(fast, reference, [x, layer.lora_A, layer.lora_B], 1e-5, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "k", "max_tokens"), [(2, 2, 256), (4, 2, 16), (8, 3, 256), (8, 2, 10)])
def test_moelora_gram_path_equals_reference(n, k, max_tokens, dtype):
    mask = padding_mask()
    layer, config, x = layer_and_step(n, k, dtype, "moelora", mask, contrastive_max_tokens=max_tokens)
    torch.manual_seed(7)
    fast = contrastive_loss(layer.record, config)
    torch.manual_seed(7)
    reference = moelora_loss(
        materialised(layer), layer.record.routing.indices, config.temperature, mask, max_tokens=max_tokens
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_same_value_and_gradients(fast, reference, [x, layer.lora_A, layer.lora_B], tol, tol)


@pytest.mark.parametrize("contrastive", ["comoe", "moelora"])
def test_router_gets_no_gradient_from_contrastive_losses(contrastive):
    """Both objectives see routing only through the discrete top-k set, in the fast path and the reference."""
    layer, config, _ = layer_and_step(4, 2, torch.float32, contrastive, None)
    fast = contrastive_loss(layer.record, config)
    assert torch.autograd.grad(fast, layer.router.weight, allow_unused=True)[0] is None
    reference = comoe_loss(materialised(layer), layer.record.routing.indices, config.temperature)
    assert torch.autograd.grad(reference, layer.router.weight, allow_unused=True)[0] is None
