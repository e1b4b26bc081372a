"""comoe.losses: the reference loss definitions under their first public name, the very same objects."""

import torch

import comoe.losses as losses
import comoe.objectives.reference as reference
from comoe.losses import load_balance_loss


def test_every_reference_name_is_re_exported_as_the_same_object():
    assert losses.__all__ == reference.__all__
    assert "load_balance_loss" in losses.__all__ and "comoe_loss" in losses.__all__
    for name in reference.__all__:
        assert getattr(losses, name) is getattr(reference, name), name


def test_star_import_gives_exactly_the_public_names():
    namespace: dict = {}
    exec("from comoe.losses import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(reference.__all__)


def test_the_re_exported_balance_loss_is_one_under_uniform_routing():
    """Through the public name: n * sum_i f_i P_i with every expert equally loaded and probable is 1."""
    probs = torch.full((8, 4), 0.25, requires_grad=True)
    indices = torch.tensor([[0, 1], [2, 3]] * 4)
    loss = load_balance_loss(probs, indices)
    assert float(loss.detach()) == 1.0
    loss.backward()
    # f_i = 1/4 for every expert: dL/dP[t, i] = n * f_i / T
    assert torch.allclose(probs.grad, torch.full((8, 4), 4 * 0.25 / 8))
