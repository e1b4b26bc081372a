"""The router z-loss (ST-MoE): the fast path against the plain reference in value and gradient, the logits
kept by the layers only when the objective is active, and the objective through `aux_objectives`."""

import pytest
import torch

from comoe import ComoeConfig, get_comoe_model
from comoe.objectives.auxiliary import requirements
from comoe.objectives.reference import router_z_loss as reference_router_z
from comoe.objectives.registry import get_objective
from comoe.objectives.router_z import ROUTER_Z, router_z_loss
from tests.helpers import tiny_llama


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_the_fast_path_is_the_reference_in_value_and_gradient(dtype, masked):
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(24, 6, generator=generator)).to(dtype).requires_grad_()
    mask = torch.rand(24, generator=generator) > 0.3 if masked else None
    fast, reference = router_z_loss(logits, mask), reference_router_z(logits, mask)
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype != torch.float64 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast, reference, **tolerance)
    assert fast.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    (got,) = torch.autograd.grad(fast, logits)
    (want,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(got, want, **tolerance)
    if masked:
        assert torch.all(got[~mask] == 0)  # padding takes no part


def test_known_values_large_logits_and_no_real_token():
    n = 4
    uniform = torch.zeros(3, n)  # logsumexp = log n for every token
    assert float(router_z_loss(uniform)) == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2)
    large = torch.tensor([[500.0, 0.0, 0.0, 0.0], [-500.0, -500.0, -500.0, -500.0]])
    expected = (500.0**2 + (-500.0 + torch.log(torch.tensor(4.0)).item()) ** 2) / 2
    assert float(router_z_loss(large)) == pytest.approx(expected, rel=1e-6)  # no overflow
    assert float(reference_router_z(large)) == pytest.approx(expected, rel=1e-6)
    logits = torch.randn(5, n, requires_grad=True)
    none = torch.zeros(5, dtype=torch.bool)
    for loss in (router_z_loss(logits, none), reference_router_z(logits, none)):
        assert float(loss) == 0.0
        loss.backward()  # still connected to the logits
    with pytest.raises(ValueError, match=r"router_logits must have shape \(T, n\), got \(5,\)"):
        router_z_loss(torch.zeros(5))


def test_it_is_registered_and_asks_the_layers_for_their_logits():
    assert get_objective("router_z") is ROUTER_Z and ROUTER_Z.component == "router_z"
    assert ROUTER_Z.needs == {"logits"}
    assert "logits" in requirements(ComoeConfig.preset("moe", aux_objectives={"router_z": 0.001}))
    assert "logits" not in requirements(ComoeConfig.preset("comoe"))
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    model = get_comoe_model(tiny_llama(), ComoeConfig.preset("moe", r=4))
    with model.record_routing() as records:
        model(input_ids=ids)
    assert records and all(record.logits is None for record in records.values())  # kept only when needed


def test_through_aux_objectives_the_loss_is_the_layer_mean_of_the_reference():
    config = ComoeConfig.preset("moe", r=4, lora_dropout=0.0, aux_objectives={"router_z": 0.001})
    torch.manual_seed(0)
    model = get_comoe_model(tiny_llama(), config).train()
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)
    attention[1, :3] = 0  # left padding: three tokens of the second row take no part
    with model.record_routing() as records:
        out = model(input_ids=ids, attention_mask=attention, labels=ids)
    losses = model.last_aux_losses()
    assert set(losses) == {"task", "balance", "contrastive", "router_z"}
    layers = list(records.values())
    assert len(layers) == 8 and all(r.logits is not None and r.logits.shape == (14, 4) for r in layers)
    assert int(layers[0].mask.sum()) == 11
    reference = torch.stack([reference_router_z(r.logits, r.mask) for r in layers]).mean()
    assert losses["router_z"] == pytest.approx(float(reference), rel=1e-6)
    assert float(out.loss) == pytest.approx(losses["task"] + 0.001 * losses["router_z"], rel=1e-6)
    # the gradient it sends the routers is the reference's
    routers = [layer.router.weight for layer in model.comoe_layers().values()]
    fast = torch.stack([ROUTER_Z.loss(r, config) for r in layers]).mean()
    got = torch.autograd.grad(fast, routers, retain_graph=True)
    want = torch.autograd.grad(reference, routers)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert all(g.abs().sum() > 0 for g in got)
