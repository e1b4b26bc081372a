"""Normalisation with a floor: F.normalize without one, a bounded gradient with one."""

import torch
import torch.nn.functional as F

from comoe.objectives.cosine import (
    NORMALIZE_EPS,
    floored_norms,
    normalize_with_floor,
    output_anchor_cosines,
    output_item_cosines,
)
from comoe.objectives.reference import cosine_similarity_matrix


def test_without_a_floor_it_is_f_normalize_and_zero_rows_stay_zero():
    x = torch.randn(5, 7, dtype=torch.float64)
    x[2] = 0
    torch.testing.assert_close(normalize_with_floor(x), F.normalize(x, eps=NORMALIZE_EPS))
    assert torch.equal(normalize_with_floor(x)[2], torch.zeros(7, dtype=torch.float64))


def test_rows_shorter_than_the_floor_shrink_linearly_and_longer_rows_are_unit():
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4]], dtype=torch.float64)  # norms 5 and 0.5
    out = normalize_with_floor(x, floor=torch.tensor([1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(out[0], x[0] / 5)
    torch.testing.assert_close(out[1], x[1] / 1.0)  # divided by the floor, not its own norm


def test_floored_norms_from_squares_match_normalize_with_floor():
    x = torch.randn(6, 4, dtype=torch.float64) * torch.tensor([1, 1e-3, 1, 1e-6, 2, 0.0]).double().unsqueeze(1)
    floor = torch.full((6,), 1e-2, dtype=torch.float64)
    norms = floored_norms((x * x).sum(-1), floor)
    torch.testing.assert_close(x / norms.unsqueeze(-1), normalize_with_floor(x, floor=floor))


def test_cosines_of_materialised_outputs_are_the_reference_matrix_rows():
    """The anchor rows and item matrix the objectives take from materialised outputs, against the
    reference's full [T, n, n] cosine matrix (with and without a per-token floor, a zero output included)."""
    torch.manual_seed(0)
    outputs = torch.randn(7, 5, 9, dtype=torch.float64)
    outputs[1, 2] = 0
    indices = torch.stack([torch.randperm(5)[:2] for _ in range(7)])
    for floor in (None, torch.rand(7, dtype=torch.float64) * 3):
        full = cosine_similarity_matrix(outputs, floor=None if floor is None else floor.unsqueeze(-1))
        rows = full.gather(1, indices.unsqueeze(-1).expand(-1, -1, 5))
        torch.testing.assert_close(output_anchor_cosines(outputs, indices, floor), rows)
        items = outputs[:, 0]
        item_floor = None if floor is None else floor
        torch.testing.assert_close(
            output_item_cosines(items, item_floor), cosine_similarity_matrix(items, floor=item_floor)
        )
    assert output_anchor_cosines(outputs.bfloat16(), indices).dtype == torch.float32
