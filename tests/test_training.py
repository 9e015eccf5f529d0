"""Shapes of the models and an end-to-end check that joint training learns."""

import pytest
import torch

from jras_core.config import JRASConfig
from jras_core.data.slices import build_slice_set
from jras_core.data.synthetic import generate_volumes
from jras_core.models import build_model
from jras_core.models.segmenter import GuidedSegmenter
from jras_core.training import JRASTrainer, evaluate

TINY = {
    "preprocess.size": 32,
    "preprocess.fov_mm": 200.0,
    "segmenter.channels": [8, 16, 32],
    "retriever.channels": [8, 16],
    "retriever.embed_dim": 16,
    "train.batch_size": 16,
}


@pytest.fixture(scope="module")
def tiny_data():
    cfg = JRASConfig().with_overrides(TINY)
    vols = generate_volumes("A", num_cases=8, seed=3, size=64)
    slices = build_slice_set(vols, cfg.preprocess, cfg.labels.num_classes)
    return slices.split_by_case(0.25, seed=0)


@pytest.mark.parametrize("fusion", ["concat", "prior", "feature", "none"])
@pytest.mark.parametrize("backbone", ["unet", "dynunet"])
def test_segmenter_shapes_and_guide_dropout(fusion, backbone):
    torch.manual_seed(0)
    seg = GuidedSegmenter(num_classes=4, k=3, fusion=fusion, backbone=backbone, channels=(8, 16, 32)).eval()
    x = torch.rand(2, 1, 32, 32)
    gi = torch.rand(2, 3, 1, 32, 32)
    gm = torch.randint(0, 4, (2, 3, 32, 32))
    sims = torch.rand(2, 3)
    out = seg(x, gi, gm, sims, torch.tensor([True, False]))
    assert out.shape == (2, 4, 32, 32)
    # a dropped sample sees exactly what a sample without guides sees
    no_guides = seg(x, guide_present=torch.zeros(2, dtype=torch.bool))
    assert torch.allclose(out[1], no_guides[1], atol=1e-5)
    if fusion != "none":
        assert not torch.allclose(out[0], no_guides[0], atol=1e-5)
        # a kept sample's guide channels do not depend on which others were dropped, and
        # the guide-free forward leaves the full input layers in place
        alone = seg(x[:1], gi[:1], gm[:1], sims[:1], torch.tensor([True]))
        assert torch.allclose(out[0], alone[0], atol=1e-5)


@pytest.mark.parametrize("backbone,fusion", [("unet", "concat"), ("dynunet", "concat"), ("unet", "feature")])
def test_channels_last_layout_computes_the_same(backbone, fusion):
    def build(channels_last):
        torch.manual_seed(0)
        return GuidedSegmenter(num_classes=4, k=3, fusion=fusion, backbone=backbone, channels=(8, 16, 32), appearance=True,
                               guide_init="default", channels_last=channels_last)

    fast, plain = build(True), build(False)
    conv = next(m for m in fast.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    x, gi, gm = torch.rand(4, 1, 32, 32), torch.rand(4, 3, 1, 32, 32), torch.randint(0, 4, (4, 3, 32, 32))
    present = torch.tensor([True, False, True, True])
    out_fast, out_plain = fast(x, gi, gm, None, present), plain(x, gi, gm, None, present)
    assert out_fast.is_contiguous()  # logits in the usual layout for the losses
    torch.testing.assert_close(out_fast, out_plain, atol=1e-4, rtol=1e-4)
    out_fast.square().mean().backward()
    out_plain.square().mean().backward()
    for (name, a), (_, b) in zip(fast.named_parameters(), plain.named_parameters()):
        assert a.grad is not None, name  # guide encoders too, through the dropped-row assembly
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("backbone", ["swinunetr", "segformer"])
def test_transformer_backbones_shape_and_gradient(backbone):
    seg = GuidedSegmenter(num_classes=4, k=3, fusion="concat", backbone=backbone, channels=(16, 32))
    out = seg(torch.rand(2, 1, 32, 32), torch.rand(2, 3, 1, 32, 32), torch.randint(0, 4, (2, 3, 32, 32)))
    assert out.shape == (2, 4, 32, 32)
    out.mean().backward()
    grads = [p.grad for p in seg.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_retriever_embeddings_are_unit_norm():
    model = build_model(JRASConfig().with_overrides(TINY))
    emb = model.retr(torch.rand(5, model.retr.in_channels, 32, 32))
    assert emb.shape == (5, 16)
    assert torch.allclose(emb.norm(dim=1), torch.ones(5), atol=1e-5)
    keys = set(model.state_dict())
    assert keys and all(k.startswith(("seg.", "retr.")) for k in keys)


def test_joint_training_raises_validation_dice(tiny_data):
    train, val = tiny_data
    cfg = JRASConfig().with_overrides({**TINY, "contrastive.steps_per_epoch": 2})
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


def test_phase_b_trains_on_the_configured_share_of_the_batches():
    from jras_core.config import ConfigError, ContrastiveConfig

    assert ContrastiveConfig(batch_fraction=1.0).phase_b_steps(6) == 6
    # the default, 0.4, is 3 of the synthetic sites' 6 or 7 batches
    assert ContrastiveConfig().phase_b_steps(6) == ContrastiveConfig().phase_b_steps(7) == 3
    assert ContrastiveConfig(batch_fraction=0.5).phase_b_steps(6) == 3
    assert ContrastiveConfig(batch_fraction=0.5).phase_b_steps(7) == 4
    assert ContrastiveConfig(batch_fraction=0.01).phase_b_steps(6) == 1
    assert ContrastiveConfig(batch_fraction=0.5, steps_per_epoch=2).phase_b_steps(6) == 2
    assert ContrastiveConfig(batch_fraction=1.0, steps_per_epoch=10).phase_b_steps(6) == 6
    for bad in ({"contrastive.batch_fraction": 0.0}, {"contrastive.batch_fraction": 1.5},
                {"contrastive.steps_per_epoch": 0}):
        with pytest.raises(ConfigError, match="contrastive"):
            JRASConfig().with_overrides(bad)


def test_phase_b_with_a_batch_fraction_takes_that_many_optimiser_steps(tiny_data):
    train, _ = tiny_data
    cfg = JRASConfig().with_overrides({**TINY, "train.batch_size": 8, "contrastive.batch_fraction": 0.5})
    trainer = JRASTrainer(build_model(cfg), cfg, train)
    steps = []
    step = trainer.retr_opt.step
    trainer.retr_opt.step = lambda *a, **k: (steps.append(1), step(*a, **k))[1]
    trainer.phase_retriever()
    batches = -(-len(train) // 8)
    assert batches >= 4 and len(steps) == -(-batches // 2)


def test_phase_b_changes_only_the_retriever(tiny_data):
    train, _ = tiny_data
    cfg = JRASConfig().with_overrides({**TINY, "contrastive.steps_per_epoch": 1, "contrastive.relevance": "utility"})
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


def test_frozen_and_none_skip_phase_b(tiny_data):
    train, _ = tiny_data
    for overrides in ({"retriever.mode": "frozen"}, {"segmenter.fusion": "none"}):
        cfg = JRASConfig().with_overrides({**TINY, **overrides})
        model = build_model(cfg)
        retr_before = {k: v.clone() for k, v in model.retr.state_dict().items()}
        metrics = JRASTrainer(model, cfg, train).train_epoch()
        assert "retr_loss" not in metrics
        assert all(torch.equal(retr_before[k], v) for k, v in model.retr.state_dict().items())
