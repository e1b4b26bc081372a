"""comoe.adapter.saved: TrainedCopy runs its trainable copy while adapters are on and the untouched original
while they are off; gradients reach the copy only; attributes are the copy's."""

import torch
from torch import nn

from comoe import ComoeConfig, get_comoe_model
from comoe.adapter.layer import ComoeContext
from comoe.adapter.saved import TrainedCopy
from tests.helpers import tiny_llama


def wrapped(seed: int = 0) -> tuple[TrainedCopy, ComoeContext, nn.Linear]:
    torch.manual_seed(seed)
    original = nn.Linear(6, 3)
    original.requires_grad_(False)  # frozen, as the base model is
    context = ComoeContext()
    return TrainedCopy(original, context), context, original


def test_the_copy_starts_equal_independent_and_trainable():
    copy, _, original = wrapped()
    assert copy.original_module is original and copy.trained_module is not original
    assert torch.equal(copy.trained_module.weight, original.weight)
    assert copy.trained_module.weight.data_ptr() != original.weight.data_ptr()
    assert all(p.requires_grad for p in copy.trained_module.parameters())
    assert not any(p.requires_grad for p in original.parameters())


def test_adapters_on_run_the_copy_and_off_run_the_original():
    copy, context, original = wrapped()
    with torch.no_grad():
        copy.trained_module.weight.add_(1.0)
    x = torch.randn(4, 6)
    expected_trained = x @ (original.weight + 1.0).t() + original.bias
    torch.testing.assert_close(copy(x), expected_trained)
    context.adapters_enabled = False
    torch.testing.assert_close(copy(x), original(x))
    context.adapters_enabled = True
    torch.testing.assert_close(copy(x), expected_trained)


def test_gradients_reach_the_copy_only():
    copy, _, original = wrapped()
    copy(torch.randn(5, 6)).pow(2).sum().backward()
    assert copy.trained_module.weight.grad is not None and copy.trained_module.weight.grad.abs().sum() > 0
    assert copy.trained_module.bias.grad is not None
    assert original.weight.grad is None and original.bias.grad is None


def test_attributes_are_those_of_the_trained_copy():
    copy, _, original = wrapped()
    assert copy.weight is copy.trained_module.weight and copy.out_features == 3
    assert copy.bias is copy.trained_module.bias
    assert sorted(name for name, _ in copy.named_parameters()) == [
        "original_module.bias",
        "original_module.weight",
        "trained_module.bias",
        "trained_module.weight",
    ]


def test_in_a_model_modules_to_save_follow_disable_adapters():
    """The LM head as a module to save: trained copy while adapters are on, the original under
    disable_adapters(), and only the copy in the adapter's tensors."""
    base = tiny_llama()
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = base(input_ids=ids).logits
    model = get_comoe_model(base, ComoeConfig(r=2, lora_dropout=0.0, modules_to_save=["lm_head"])).eval()
    head = model.wrapped_model.lm_head
    assert isinstance(head, TrainedCopy)
    with torch.no_grad():
        head.trained_module.weight.mul_(2.0)
        doubled = model(input_ids=ids).logits
        with model.disable_adapters():
            torch.testing.assert_close(model(input_ids=ids).logits, reference)
    torch.testing.assert_close(
        doubled, 2.0 * reference, rtol=1e-4, atol=1e-5
    )  # B = 0: the experts add nothing
    saved = model.adapter_state_dict()
    assert any("lm_head.trained_module" in name for name in saved)
    assert not any("original_module" in name for name in saved)
