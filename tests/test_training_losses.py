"""Tests of jras_core.training.losses: the soft InfoNCE and per-sample segmentation losses."""

import torch

from jras_core.training.losses import per_sample_dice_ce, soft_info_nce


def test_soft_info_nce_prefers_relevant_candidates():
    relevance = torch.tensor([[1.0, 0.0, 0.0]])
    good = soft_info_nce(torch.tensor([[0.9, 0.1, 0.0]]), relevance, 0.1, 0.05)
    bad = soft_info_nce(torch.tensor([[0.0, 0.1, 0.9]]), relevance, 0.1, 0.05)
    assert good < bad
    masked = soft_info_nce(torch.tensor([[0.9, 0.1, 5.0]]), relevance, 0.1, 0.05,
                           valid=torch.tensor([[True, True, False]]))
    assert torch.isfinite(masked) and masked < bad


def test_per_sample_loss_is_lower_for_correct_prediction():
    labels = torch.randint(0, 3, (2, 8, 8))
    right = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).float() * 10
    wrong = torch.roll(right, 1, dims=1)
    assert (per_sample_dice_ce(right, labels) < per_sample_dice_ce(wrong, labels)).all()
