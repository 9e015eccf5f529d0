"""Tests of jras_core.training.joint: alternating training of segmenter and retriever."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_methods import BASE, INPUT_PATH_DROPOUT, TINY, TINY16, one_patient, sized_retriever_model

from jras_core.config import ConfigError, JRASConfig
from jras_core.models.jras import build_model
from jras_core.retrieval.finder import GuideFinder
from jras_core.training import JRASTrainer, evaluate


@pytest.mark.slow
def test_joint_training_raises_validation_dice(tiny_data):
    train, val = tiny_data
    cfg = JRASConfig().with_overrides({**TINY16, "contrastive.steps_per_epoch": 2})
    model = build_model(cfg)
    trainer = JRASTrainer(model, cfg, train)
    before = evaluate(model, val, cfg, trainer.bank, diagnostics=False)["dice_mean"]
    history = trainer.fit(6)
    after = evaluate(model, val, cfg, trainer.bank)
    # six tiny epochs: the default appearance channels slow the start (0.25 without them)
    assert after["dice_mean"] > before + 0.08, (before, after)
    assert history[-1]["seg_loss"] < history[0]["seg_loss"]
    assert "retr_loss" in history[0] and "refresh_time_s" in history[0]
    for key in ("guide_dice", "dice_oracle", "dice_random", "dice_noguide", "hd95_mean"):
        assert key in after
    assert 0.0 <= after["guide_dice"] <= 1.0


def test_phase_b_with_a_batch_fraction_takes_that_many_optimiser_steps(tiny_data):
    train, _ = tiny_data
    cfg = JRASConfig().with_overrides({**TINY16, "train.batch_size": 8, "contrastive.batch_fraction": 0.5})
    trainer = JRASTrainer(build_model(cfg), cfg, train)
    steps = []
    step = trainer.retr_opt.step
    trainer.retr_opt.step = lambda *a, **k: (steps.append(1), step(*a, **k))[1]
    trainer.phase_retriever()
    batches = -(-len(train) // 8)
    assert batches >= 4 and len(steps) == -(-batches // 2)


def test_phase_b_changes_only_the_retriever(tiny_data):
    train, _ = tiny_data
    cfg = JRASConfig().with_overrides({**TINY16, "contrastive.steps_per_epoch": 1, "contrastive.relevance": "utility"})
    model = build_model(cfg)
    trainer = JRASTrainer(model, cfg, train)
    seg_before = {k: v.clone() for k, v in model.seg.state_dict().items()}
    retr_before = {k: v.clone() for k, v in model.retr.state_dict().items()}
    emb_before = trainer.bank.embeddings.copy()
    metrics = trainer.phase_retriever()
    assert all(torch.equal(seg_before[k], v) for k, v in model.seg.state_dict().items())
    assert any(not torch.equal(retr_before[k], v) for k, v in model.retr.state_dict().items())
    assert (trainer.bank.embeddings != emb_before).any()  # bank refreshed
    assert metrics["retr_loss"] > 0


@pytest.mark.slow
def test_frozen_and_none_skip_phase_b(tiny_data):
    train, _ = tiny_data
    for overrides in ({"retriever.mode": "frozen"}, {"segmenter.fusion": "none"}):
        cfg = JRASConfig().with_overrides({**TINY16, **overrides})
        model = build_model(cfg)
        retr_before = {k: v.clone() for k, v in model.retr.state_dict().items()}
        metrics = JRASTrainer(model, cfg, train).train_epoch()
        assert "retr_loss" not in metrics
        assert all(torch.equal(retr_before[k], v) for k, v in model.retr.state_dict().items())


@pytest.mark.slow
def test_residual_training_learns_both_paths(tiny_data):
    train, val = tiny_data
    cfg = JRASConfig().with_overrides({**TINY16, "contrastive.steps_per_epoch": 2, "retrieval.guide_dropout": 0.0,
                                       "segmenter.guide_path": "residual"})
    model = build_model(cfg)
    trainer = JRASTrainer(model, cfg, train)
    head_before = model.seg.head_out.weight.detach().clone()
    before = evaluate(model, val, cfg, trainer.bank, diagnostics=False)["dice_mean"]
    history = trainer.fit(6)
    after = evaluate(model, val, cfg, trainer.bank)
    assert after["dice_noguide"] > before + 0.08, (before, after)  # the backbone learnt from its own loss
    assert not torch.equal(head_before, model.seg.head_out.weight)  # the head learnt a correction
    assert after["dice_mean"] != after["dice_noguide"]
    assert history[-1]["seg_loss"] < history[0]["seg_loss"]


@pytest.mark.slow
def test_training_with_a_smaller_retriever_input(slices):
    from jras_core.training.joint import JRASTrainer

    cfg = JRASConfig().with_overrides({**TINY, "retriever.input_size": 16, "contrastive.steps_per_epoch": 1})
    model = sized_retriever_model(cfg)
    trainer = JRASTrainer(model, cfg, slices)
    before = trainer.bank.embeddings.copy()
    metrics = trainer.train_epoch()
    assert np.isfinite(metrics["retr_loss"]) and metrics["retr_time_s"] > 0
    assert trainer.bank.embeddings.shape == (len(slices), 8) and (trainer.bank.embeddings != before).any()
    # bank entries are embedded from 16 px inputs, like the queries
    with torch.no_grad():
        first = model.retr.eval()(F.avg_pool2d(trainer.bank.retriever_input(slice(0, 4)), 2))
    assert np.allclose(trainer.bank.embeddings[:4], first.numpy(), atol=1e-5)


class _PassOneCounter:
    """Counts the queries that ``GuideFinder.first_pass`` runs on."""

    def __init__(self, finder: GuideFinder):
        self.images = 0
        original = finder.first_pass

        def counted(images):
            self.images += images.shape[0]
            return original(images)

        finder.first_pass = counted


@pytest.mark.slow
def test_reused_first_pass_runs_pass_one_only_for_unseen_slices(slices):
    from jras_core.training.joint import JRASTrainer

    n = len(slices)
    fresh_cfg = JRASConfig().with_overrides({**TINY, **INPUT_PATH_DROPOUT, "retrieval.first_pass": "fresh",
                                             "contrastive.batch_fraction": 1.0})
    fresh = JRASTrainer(build_model(fresh_cfg), fresh_cfg, slices)
    fresh_count = _PassOneCounter(fresh.finder)
    fresh.phase_segmenter()  # pass 1 only for the queries whose guides are not dropped
    assert fresh.memory is None and 0 < fresh_count.images < n
    fresh_count.images = 0
    fresh.phase_retriever()
    assert fresh_count.images == n

    cfg = fresh_cfg.with_overrides({"retrieval.first_pass": "reuse"})
    trainer = JRASTrainer(build_model(cfg), cfg, slices)
    count = _PassOneCounter(trainer.finder)
    trainer.phase_segmenter()
    assert 0 < count.images < n and bool(trainer.memory.known.all())
    remembered, _ = trainer.memory.recall(torch.arange(n))
    # what phase A kept is its own (guided) prediction, not the pass 1 it started from
    first = trainer.finder.first_pass(slices.images)
    count.images = 0
    assert (remembered - first).abs().max() > 0.05
    trainer.phase_retriever()
    trainer.phase_segmenter()
    assert count.images == 0
    # phase B's queries are the remembered views with their predictions, not new augmentations
    seen = []
    query_input = trainer.finder.query_input
    trainer.finder.query_input = lambda images, probs: seen.append((images, probs)) or query_input(images, probs)
    augmented = []
    augment = trainer.augment
    trainer.augment = lambda x: augmented.append(x) or augment(x)
    trainer.phase_retriever()
    assert len(seen) == len(trainer._batches()) and not augmented
    all_views, all_probs = trainer.memory.views(torch.arange(n)), trainer.memory.recall(torch.arange(n))[0]
    for images, probs in seen:
        rows = [int((all_views - img).abs().flatten(1).sum(1).argmin()) for img in images]
        assert torch.equal(images, all_views[rows]) and torch.equal(probs, all_probs[rows])
    # a later trainer given the memory (as a site keeps it across rounds) starts from it
    later = JRASTrainer(build_model(cfg), cfg, slices, memory=trainer.memory)
    later_count = _PassOneCounter(later.finder)
    later.phase_segmenter()
    assert later_count.images == 0


@pytest.mark.slow
def test_warmup_first_epoch_trains_without_guides_and_fills_the_memory(slices):
    from jras_core.training.joint import JRASTrainer

    cfg = JRASConfig().with_overrides({**TINY, "retrieval.first_pass": "warmup", "retrieval.guide_dropout": 0.0})
    trainer = JRASTrainer(build_model(cfg), cfg, slices)
    count = _PassOneCounter(trainer.finder)
    guided_inputs = []
    forward = trainer.model.seg.forward

    def watched(images, guide_images=None, *args, **kwargs):
        guided_inputs.append(guide_images is not None)
        return forward(images, guide_images, *args, **kwargs)

    trainer.model.seg.forward = watched
    found = []
    find = trainer.finder.find
    trainer.finder.find = lambda *a, **k: found.append(1) or find(*a, **k)
    trainer.fit(2)
    steps = len(trainer._batches())
    # epoch 0: guide-free steps that fill the memory; epoch 1: every step guided, no pass 1 at all
    assert guided_inputs[:steps] == [False] * steps and all(guided_inputs[steps : 2 * steps])
    assert count.images == 0 and len(found) == steps and bool(trainer.memory.known.all())

    # a call of a single epoch stays guided (pass 1 for the unseen slices, as with reuse)
    single = JRASTrainer(build_model(cfg), cfg, slices)
    single_count = _PassOneCounter(single.finder)
    single.fit(1)
    assert single_count.images == len(slices)


def test_stored_keys_embed_only_the_queries_in_phase_b(slices):
    from jras_core.training.joint import JRASTrainer

    cfg = JRASConfig().with_overrides({**TINY, "contrastive.keys": "stored", "contrastive.batch_fraction": 1.0})
    model = build_model(cfg)
    trainer = JRASTrainer(model, cfg, slices)
    embedded = []
    handle = model.retr.register_forward_hook(lambda mod, inp, out: embedded.append(inp[0].shape[0]))
    before = [p.detach().clone() for p in model.retr.parameters()]
    trainer.bank.refresh = lambda retriever: None  # count phase B's own forwards only
    metrics = trainer.phase_retriever()
    handle.remove()
    bs = cfg.train.batch_size
    expected = [min(bs, n - i) for n in [len(slices)] for i in range(0, n, bs)]
    assert embedded == expected  # one forward per batch, of its queries: no candidate is embedded
    assert np.isfinite(metrics["retr_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.retr.parameters()))
    idx = torch.tensor([[2, -1], [0, 5]])
    rows = trainer.bank.embeddings_at(idx)
    assert rows.shape == (2, 2, 8) and torch.equal(rows[1, 1], torch.from_numpy(trainer.bank.embeddings[5]))
    assert torch.equal(rows[0, 1], torch.from_numpy(trainer.bank.embeddings[0]))


@pytest.mark.slow
def test_phase_a_retrieves_only_for_queries_that_keep_their_guides(slices):
    from jras_core.training.joint import JRASTrainer

    cfg = JRASConfig().with_overrides({**TINY, **INPUT_PATH_DROPOUT, "retrieval.guide_dropout": 0.5})
    model = build_model(cfg)
    trainer = JRASTrainer(model, cfg, slices)
    found, kept = [], []
    find = trainer.finder.find
    trainer.finder.find = lambda images, *a, **kw: found.append(images.shape[0]) or find(images, *a, **kw)
    forward = model.seg.forward

    def seg_forward(image, guide_images=None, guide_masks=None, guide_sims=None, guide_present=None):
        if guide_images is not None:  # a phase-A step (pass 1 comes without guides)
            kept.append(guide_present.clone())
            # dropped queries come with blank guides; kept ones with real ones
            assert not guide_images[~guide_present].any() and not guide_masks[~guide_present].any()
            assert guide_masks[guide_present].flatten(1).any(dim=1).all()
        return forward(image, guide_images, guide_masks, guide_sims, guide_present)

    model.seg.forward = seg_forward
    trainer.phase_segmenter()
    present = torch.cat(kept)
    assert len(present) == len(slices) and 0 < int(present.sum()) < len(slices)
    assert sum(found) == int(present.sum())


@pytest.mark.slow
def test_single_patient_site_trains_with_guides_from_its_other_phase():
    from jras_core.training.joint import JRASTrainer

    cfg = JRASConfig().with_overrides({**TINY, "retrieval.guide_dropout": 0.0})
    one = one_patient(cfg)
    counts = {}
    volume_of = [v.key for v in one.volumes]
    for unit in ("case", "auto"):
        trainer = JRASTrainer(build_model(cfg), cfg.with_overrides({"retrieval.exclude": unit}), one)
        guided = []
        find = trainer.finder.find

        def spy(images, owners=None, *a, _find=find, _guided=guided, **kw):
            guides, probs = _find(images, owners, *a, **kw)
            _guided.append((guides.idx >= 0).any(dim=1))
            # a guide never comes from the query's own volume
            for row, owner in zip(guides.idx.tolist(), owners):
                assert all(volume_of[one.volume_ids[i]] != owner for i in row if i >= 0)
            return guides, probs

        trainer.finder.find = spy
        trainer.phase_segmenter()
        counts[unit] = int(torch.cat(guided).sum())
    assert counts["case"] == 0
    assert counts["auto"] == len(one)


def _trainer_with_echo_guides(mode: str, k: int = 3):
    """A trainer (``augment.guides = mode``, noise off) whose finder returns each query's own
    image K times as its guides (the last one missing), so shared appearance is checkable."""
    from jras_core.retrieval.finder import Guides
    from jras_core.site import Site
    from jras_core.training.joint import JRASTrainer
    from tools.sites import synthetic_site

    cfg = JRASConfig().with_overrides({**BASE, "augment.guides": mode, "augment.prob": 1.0,
                                       "augment.noise_std": 0.0, "retrieval.k": k})
    site = Site(synthetic_site("A", 2, 0, 32), cfg)
    trainer = JRASTrainer(build_model(cfg), cfg, site.train_set)
    seen = {}

    def find(images, case_names=None, train_pool=None, **_):
        seen["query"] = images
        b, _, h, w = images.shape
        idx = torch.arange(k).repeat(b, 1)
        idx[:, -1] = -1
        guide_images = images.unsqueeze(1).repeat(1, k, 1, 1, 1)
        guide_images[:, -1] = 0.0
        return Guides(guide_images, torch.zeros(b, k, h, w, dtype=torch.long), torch.zeros(b, k), idx), None

    trainer.finder.find = find
    return trainer, seen


def test_shared_guide_augmentation_gives_query_and_guides_one_appearance():
    trainer, seen = _trainer_with_echo_guides("shared")
    idx = torch.arange(6)
    images, guides = trainer._guided_batch(idx, torch.ones(6, dtype=torch.bool))
    raw = trainer.train_set.images[idx]
    assert torch.equal(seen["query"], raw)  # retrieval sees the unaugmented query
    assert not torch.allclose(images, raw, atol=1e-3)  # the query was changed
    for j in range(2):  # each present guide (here: the query's own image) changed the same way
        torch.testing.assert_close(guides.images[:, j], images, atol=1e-5, rtol=0)
    assert torch.count_nonzero(guides.images[:, -1]) == 0  # a missing guide stays blank
    # queries whose guides are dropped are changed alone; the kept ones still share theirs
    keep = torch.tensor([True, False, True, False, False, True])
    images, guides = trainer._guided_batch(idx, keep)
    assert not torch.allclose(images[~keep], raw[~keep], atol=1e-3)
    assert torch.count_nonzero(guides.images[~keep]) == 0 and bool((guides.idx[~keep] < 0).all())
    for j in range(2):
        torch.testing.assert_close(guides.images[keep, j], images[keep], atol=1e-5, rtol=0)


def test_independent_and_no_guide_augmentation():
    trainer, seen = _trainer_with_echo_guides("independent")
    images, guides = trainer._guided_batch(torch.arange(6), torch.ones(6, dtype=torch.bool))
    assert torch.equal(seen["query"], images)  # retrieval with the augmented query
    assert not torch.allclose(guides.images[:, 0], guides.images[:, 1], atol=1e-3)  # each guide its own change
    assert not torch.allclose(guides.images[:, 0], images, atol=1e-3)
    assert torch.count_nonzero(guides.images[:, -1]) == 0
    trainer, seen = _trainer_with_echo_guides("none")
    images, guides = trainer._guided_batch(torch.arange(6), torch.ones(6, dtype=torch.bool))
    assert torch.equal(guides.images[:, 0], seen["query"]) and torch.equal(seen["query"], images)
    with pytest.raises(ConfigError, match="augment.guides"):
        JRASConfig().with_overrides({"augment.guides": "both"})


@pytest.mark.slow
def test_phase_a_warps_query_labels_and_guides_together():
    """In phase A one spatial draw moves a query, its labels and its guides alike: with a
    guide equal to its query, the warped guide equals the warped query, and the warped
    guide mask equals the warped labels."""
    from jras_core.config import JRASConfig
    from jras_core.data.slices import build_slice_set
    from jras_core.data.synthetic import generate_volumes
    from jras_core.models import build_model
    from jras_core.retrieval.finder import Guides
    from jras_core.training import JRASTrainer

    cfg = JRASConfig().with_overrides({
        "preprocess.size": 32, "preprocess.fov_mm": 200.0, "segmenter.channels": [8, 16], "retriever.channels": [8],
        "retriever.embed_dim": 8, "augment.rotate_deg": 180.0, "augment.flip": True, "augment.scale": 0.2,
        "augment.prob": 1.0, "train.epochs": 1, "train.device": "cpu",
    })
    slices = build_slice_set(generate_volumes("A", num_cases=4, seed=1, size=64), cfg.preprocess, cfg.labels.num_classes)
    trainer = JRASTrainer(build_model(cfg), cfg, slices)
    images, labels = slices.images[:4], slices.masks[:4].long()
    guides = Guides(images.unsqueeze(1).repeat(1, 3, 1, 1, 1), labels.to(torch.uint8).unsqueeze(1).repeat(1, 3, 1, 1),
                    torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.long))
    w_images, w_labels, w_guides, draw = trainer._warp(images, labels, guides)
    assert not torch.equal(w_labels, labels)  # something moved
    for j in range(3):
        assert torch.allclose(w_guides.images[:, j], w_images, atol=1e-5)
        assert torch.equal(w_guides.masks[:, j].long(), w_labels)
    history = trainer.fit()
    assert history and torch.isfinite(torch.tensor(history[0]["seg_loss"]))
