"""Tests of jras_core.training.evaluate: prediction with test-time draws, passes and views."""

from __future__ import annotations

import pytest
import torch
from tiny_methods import TINY, inference_setup

from jras_core.config import ConfigError, JRASConfig
from jras_core.models.jras import build_model
from jras_core.retrieval.finder import GuideFinder


def test_test_draws_average_the_softmax_over_guide_sets(slices):
    from jras_core.training.evaluate import predict

    cfg, model, bank, queries = inference_setup(slices, passes=1)
    _, used_one = predict(model, queries, cfg, bank, exclude_own_case=False, seed=4)
    drawn_cfg = cfg.with_overrides({"retrieval.test_draws": 3})
    three, used_three = predict(model, queries, drawn_cfg, bank, exclude_own_case=False, seed=4)
    # the first set is the top K, as with one draw
    assert torch.equal(torch.cat([g.idx for g in used_one]), torch.cat([g.idx for g in used_three]))
    # the prediction is the argmax of the mean softmax over the top K and two draws from the pool
    finder = GuideFinder(model, bank, drawn_cfg, torch.Generator().manual_seed(4))
    with torch.no_grad():
        sets = finder.find_draws(queries.images, 3)
        assert len(sets) == 3 and all(g.idx.shape == (len(queries), 3) for g in sets)
        top_pool = finder.rank(queries.images, finder.first_pass(queries.images), 5, None)[1]
        for g in sets[1:]:
            assert all(set(row) <= set(pool) for row, pool in zip(g.idx.tolist(), top_pool.tolist()))
        probs = torch.stack([
            torch.softmax(model.seg(queries.images, g.images, g.masks, g.sims, (g.idx >= 0).any(1)), dim=1)
            for g in sets
        ]).mean(0)
    assert torch.equal(three, probs.argmax(1))
    assert not torch.equal(sets[1].idx, sets[0].idx) or not torch.equal(sets[2].idx, sets[0].idx)
    with pytest.raises(ConfigError, match="test_draws"):
        JRASConfig().with_overrides({"retrieval.test_draws": 0})


def test_test_passes_retrieve_again_with_the_guided_prediction(slices, monkeypatch):
    from jras_core.training.evaluate import predict

    cfg, model, bank, queries = inference_setup(slices, passes=2)
    calls = []
    find = GuideFinder.find

    def spy(self, images, owners=None, source="retrieved", true_masks=None, train_pool=None, probs=None):
        guides, used = find(self, images, owners, source, true_masks, train_pool, probs)
        calls.append((probs, used, guides))
        return guides, used

    monkeypatch.setattr(GuideFinder, "find", spy)
    pred, used = predict(model, queries, cfg, bank, exclude_own_case=False)
    assert len(calls) == 2 and calls[0][0] is None  # round 1: the guide-free pass 1
    with torch.no_grad():
        first = calls[0][2]
        logits = model.seg(queries.images, first.images, first.masks, first.sims, (first.idx >= 0).any(1))
        # round 2 retrieves and aligns with round 1's guided prediction
        assert torch.allclose(calls[1][0], torch.softmax(logits, dim=1), atol=1e-6)
        second = calls[1][2]
        final = model.seg(queries.images, second.images, second.masks, second.sims, (second.idx >= 0).any(1))
    assert torch.equal(pred, final.argmax(1)) and used[0] is second
    with pytest.raises(ConfigError, match="test_passes"):
        JRASConfig().with_overrides({"retrieval.test_passes": 0})


def test_test_views_average_shared_intensity_changes_of_query_and_guides(slices, monkeypatch):
    from jras_core.data.augment import BatchIntensityAugment
    from jras_core.models.segmenter import GuidedSegmenter
    from jras_core.training.evaluate import _with_views, predict

    cfg, model, bank, queries = inference_setup(slices, passes=1)
    # noiseless changes, on every view: a guide equal to its query must stay equal to it
    viewed = cfg.with_overrides({"augment.test_views": 3, "augment.prob": 1.0, "augment.noise_std": 0.0})
    plain_pred, used = predict(model, queries, cfg, bank, exclude_own_case=False)
    seen = []
    forward = GuidedSegmenter.forward

    def spy(self, image, guide_images=None, guide_masks=None, guide_sims=None, guide_present=None):
        seen.append((image.clone(), None if guide_images is None else guide_images.clone()))
        return forward(self, image, guide_images, guide_masks, guide_sims, guide_present)

    monkeypatch.setattr(GuidedSegmenter, "forward", spy)
    pred, _ = predict(model, queries, viewed, bank, exclude_own_case=False, seed=2)
    views = seen[-3:]  # after pass 1 and the guided forward: the three changed views
    guides = used[0]
    for image, guide_images in views:
        assert not torch.allclose(image, queries.images)  # the query was changed
        # every present guide received a change, and missing ones stay blank
        present = guides.idx >= 0
        assert not torch.allclose(guide_images[present], guides.images[present])
        assert torch.all(guide_images[~present] == 0)
    # the same draw for a query and its guides: with the guides replaced by the query itself,
    # each changed guide equals its changed query
    same = guides.with_images(queries.images.unsqueeze(1).expand_as(guides.images).clone())
    seen.clear()
    with torch.no_grad():
        probs = torch.softmax(model.seg(queries.images, same.images, same.masks, same.sims, same.idx.ge(0).any(1)), 1)
        averaged = _with_views(model, queries.images, same, probs, BatchIntensityAugment(viewed.augment, seed=5), 3,
                               viewed)
    assert averaged.shape == probs.shape and torch.allclose(averaged.sum(1), torch.ones_like(averaged[:, 0]))
    for image, guide_images in seen[1:]:
        for k in range(guide_images.shape[1]):
            rows = same.idx[:, k] >= 0
            assert torch.allclose(guide_images[rows, k], image[rows], atol=1e-5)
    # an unchanged prediction without views, a different one with them, and the same again for the same seed
    assert torch.equal(plain_pred, predict(model, queries, cfg, bank, exclude_own_case=False)[0])
    again, _ = predict(model, queries, viewed, bank, exclude_own_case=False, seed=2)
    assert torch.equal(pred, again)


def test_test_views_for_a_model_without_retrieval_and_validation(slices):
    from jras_core.training.evaluate import predict

    cfg = JRASConfig().with_overrides({**TINY, "segmenter.fusion": "none", "postprocess.largest_component": False})
    torch.manual_seed(0)
    model = build_model(cfg)
    queries = slices.subset(torch.arange(0, len(slices), 3))
    viewed = cfg.with_overrides({"augment.test_views": 2})
    with torch.no_grad():
        base = torch.softmax(model.seg(queries.images), dim=1)
    pred, used = predict(model, queries, viewed, seed=1)
    assert used == []
    # the averaged probabilities differ from the unchanged query's: some pixel's label moves
    assert pred.shape == base.argmax(1).shape and not torch.equal(pred, base.argmax(1))
    with pytest.raises(ConfigError, match="test_views"):
        JRASConfig().with_overrides({"augment.test_views": -1})
    with pytest.raises(ConfigError, match="augment.intensity"):
        JRASConfig().with_overrides({"augment.test_views": 2, "augment.intensity": False})
