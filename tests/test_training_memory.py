"""Tests of jras_core.training.memory: the prediction memory."""

from __future__ import annotations

import pytest
import torch


def test_prediction_memory_round_trip():
    from jras_core.training.memory import PredictionMemory

    mem = PredictionMemory(6, num_classes=4, size=8)
    probs = torch.softmax(torch.randn(3, 4, 8, 8), dim=1)
    views = torch.rand(3, 1, 8, 8)
    idx = torch.tensor([4, 0, 2])
    mem.store(idx, probs, views)
    back, known = mem.recall(torch.tensor([0, 1, 2, 4]))
    assert known.tolist() == [True, False, True, True]
    assert torch.allclose(back[[0, 2, 3]], probs[[1, 2, 0]], atol=2.5 / 255)
    assert torch.equal(back[1, 0], torch.ones(8, 8)) and not back[1, 1:].any()  # unknown: background
    assert torch.allclose(mem.views(torch.tensor([2, 4])), views[[2, 0]], atol=1e-3)
    with pytest.raises(ValueError, match=r"\(3, 4, 8, 8\)"):
        mem.store(idx, probs[:, :3], views)
