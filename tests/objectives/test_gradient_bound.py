"""The contrastive gradient stays bounded when expert outputs are zero or tiny (the norm floor).

Without a floor, the cosine's gradient is 1 / max(|e|, 1e-8): an expert still at B = 0 among trained ones
gave a contrastive gradient 10^3-10^4 times the task gradient, so clipping spent early steps on it. Stated
bound, at the default weight (0.01) and floor (1e-3 of |W0 x|): |grad 0.01*contrastive| <= 10 |grad task|
on this tiny Llama with one zero-B expert per layer (measured ~8x; on SmolLM2 after one AdamW step 0.013x,
benchmarks/results/gradient_scale.json).
"""

import pytest
import torch

from comoe import ComoeConfig, get_comoe_model
from tests.helpers import tiny_llama

BOUND = 10.0


def gradient_norms(floor: float, trained_std: float | None) -> tuple[float, float]:
    """(|grad task|, |grad 0.01 * contrastive|) over the adapter's parameters for one batch."""
    torch.manual_seed(0)
    config = ComoeConfig.preset("comoe", r=4, lora_dropout=0.0, contrastive_norm_floor=floor)
    model = get_comoe_model(tiny_llama(), config).train()
    if trained_std is not None:
        with torch.no_grad():
            for layer in model.comoe_layers().values():
                layer.lora_B.normal_(0, trained_std)
                layer.lora_B[0] = 0  # one expert per layer that no token has been routed to yet
    ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, labels=ids)
    params = [p for p in model.parameters() if p.requires_grad]

    def norm(loss: torch.Tensor) -> float:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return float(torch.sqrt(sum((g**2).sum() for g in grads if g is not None)))

    return norm(out.loss - model.weighted_aux_loss), norm(model.weighted_aux_parts["contrastive"])


def test_at_initialisation_the_contrastive_gradient_is_finite_and_zero():
    task, contrastive = gradient_norms(ComoeConfig.contrastive_norm_floor, trained_std=None)
    assert task > 0 and contrastive == 0.0


@pytest.mark.parametrize("std", [0.02, 0.002])
def test_one_zero_expert_keeps_the_contrastive_gradient_within_the_bound(std):
    task, contrastive = gradient_norms(ComoeConfig.contrastive_norm_floor, trained_std=std)
    assert torch.isfinite(torch.tensor(contrastive)) and 0 < contrastive <= BOUND * task
    plain_task, plain = gradient_norms(0.0, trained_std=std)  # the paper's plain cosine: the blow-up
    assert plain > 1000 * plain_task


def test_the_floor_is_a_fraction_of_the_base_output_norm():
    torch.manual_seed(0)
    config = ComoeConfig.preset("comoe", r=4, lora_dropout=0.0, contrastive_norm_floor=0.01)
    model = get_comoe_model(tiny_llama(), config)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    captured = {}
    layer = model.comoe_layers()["model.layers.0.self_attn.q_proj"]
    hook = layer.base_layer.register_forward_hook(lambda m, i, o: captured.update(out=o.detach()))
    with model.record_routing() as records:
        model(input_ids=ids, labels=ids)
    hook.remove()
    expected = 0.01 * captured["out"].reshape(-1, layer.out_features).norm(dim=-1) / layer.scaling
    torch.testing.assert_close(records["model.layers.0.self_attn.q_proj"].norm_floor, expected)
