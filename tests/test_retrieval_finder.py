"""Tests of jras_core.retrieval.finder: the guide finder and the guides it assembles."""

from __future__ import annotations

import pytest
import torch
from tiny_methods import TINY, inference_setup, sized_retriever_model

from jras_core.config import ConfigError, JRASConfig
from jras_core.models.jras import build_model
from jras_core.retrieval.bank import RetrievalBank
from jras_core.retrieval.finder import GuideFinder


def test_finder_refuses_a_retriever_built_for_another_input_size(slices):
    cfg = JRASConfig().with_overrides({**TINY, "retriever.input_size": 16})
    bank = RetrievalBank(slices, cfg.labels.num_classes)
    with pytest.raises(ValueError, match="input_size"):
        GuideFinder(build_model(cfg.with_overrides({"retriever.input_size": None})), bank, cfg)
    GuideFinder(sized_retriever_model(cfg), bank, cfg)


def test_guides_placed_in_a_larger_batch():
    from jras_core.retrieval.finder import Guides

    sub = Guides(torch.rand(2, 3, 1, 4, 4), torch.randint(1, 4, (2, 3, 4, 4)), torch.rand(2, 3),
                 torch.tensor([[5, 6, 7], [8, -1, 9]]))
    out = sub.placed(torch.tensor([3, 0]), 5)
    assert out.images.shape == (5, 3, 1, 4, 4) and out.idx.shape == (5, 3)
    assert torch.equal(out.images[3], sub.images[0]) and torch.equal(out.masks[0], sub.masks[1])
    assert torch.equal(out.idx[[1, 2, 4]], torch.full((3, 3), -1)) and not out.images[[1, 2, 4]].any()
    assert not out.masks[[1, 2, 4]].any() and not out.sims[[1, 2, 4]].any()


def test_align_scale_matches_the_guides_foreground_area_to_the_predicted_one(slices):
    cfg, model, bank, _ = inference_setup(slices, passes=1)
    scaled_cfg = cfg.with_overrides({"retrieval.align_scale": 1.5})
    idx = torch.arange(6).view(2, 3)
    guide_area = bank.areas_at(idx)
    # a predicted foreground of a known area for each query: a square at the image centre
    size = slices.size
    probs = torch.zeros(2, cfg.labels.num_classes, size, size)
    probs[:, 0] = 1.0
    sides = [10, 14]
    for row, side in enumerate(sides):
        lo = (size - side) // 2
        probs[row, 0, lo:lo + side, lo:lo + side] = 0.0
        probs[row, 1, lo:lo + side, lo:lo + side] = 1.0
    plain = GuideFinder(model, bank, cfg).assemble(idx, torch.zeros(2, 3), probs)
    scaled = GuideFinder(model, bank, scaled_cfg).assemble(idx, torch.zeros(2, 3), probs)
    plain_area = (plain.masks > 0).flatten(2).sum(2).float()
    scaled_area = (scaled.masks > 0).flatten(2).sum(2).float()
    target = torch.tensor(sides, dtype=torch.float32).square().view(2, 1).expand(2, 3)
    wanted = target.clamp(guide_area / 1.5**2, guide_area * 1.5**2)  # within the largest magnification
    assert torch.all((scaled_area - wanted).abs() <= (plain_area - wanted).abs())
    torch.testing.assert_close(scaled_area, wanted, atol=0.0, rtol=0.25)
    with pytest.raises(ConfigError, match="align_scale"):
        JRASConfig().with_overrides({"retrieval.align_scale": 0.5})
    with pytest.raises(ConfigError, match="align_centroid"):
        JRASConfig().with_overrides({"retrieval.align_scale": 1.5, "retrieval.align_centroid": False})
