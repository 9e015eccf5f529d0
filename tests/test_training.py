"""Shapes of the models and an end-to-end check that joint training learns."""

import pytest
import torch

from jras_core.config import ConfigError, JRASConfig
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_frozen_and_none_skip_phase_b(tiny_data):
    train, _ = tiny_data
    for overrides in ({"retriever.mode": "frozen"}, {"segmenter.fusion": "none"}):
        cfg = JRASConfig().with_overrides({**TINY, **overrides})
        model = build_model(cfg)
        retr_before = {k: v.clone() for k, v in model.retr.state_dict().items()}
        metrics = JRASTrainer(model, cfg, train).train_epoch()
        assert "retr_loss" not in metrics
        assert all(torch.equal(retr_before[k], v) for k, v in model.retr.state_dict().items())


# ----------------------------------------------------------------- residual guide path


def _inputs(b=4, size=32, k=3, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 1, size, size, generator=g), torch.rand(b, k, 1, size, size, generator=g),
            torch.randint(0, classes, (b, k, size, size), generator=g), torch.rand(b, k, generator=g))


@pytest.mark.parametrize("fusion", ["concat", "prior", "feature"])
def test_untrained_residual_segmenter_equals_its_guide_free_path(fusion):
    torch.manual_seed(0)
    seg = GuidedSegmenter(4, k=3, fusion=fusion, channels=(8, 16, 32), appearance=True, guide_path="residual").eval()
    x, gi, gm, sims = _inputs()
    assert seg.in_channels == 1  # the backbone reads the query alone
    assert torch.allclose(seg(x, gi, gm, sims), seg(x), atol=1e-6)
    with torch.no_grad():  # once the head's last layer is not zero, guides change the output
        seg.head_out.weight.normal_()
    guided = seg(x, gi, gm, sims, torch.tensor([True, False, True, True]))
    plain = seg(x)
    assert not torch.allclose(guided[0], plain[0], atol=1e-4)
    assert torch.allclose(guided[1], plain[1], atol=1e-6)  # no guides: the guide-free logits


def test_guided_loss_never_reaches_the_backbone():
    torch.manual_seed(0)
    seg = GuidedSegmenter(4, k=3, fusion="concat", channels=(8, 16, 32), guide_path="residual")
    x, gi, gm, _ = _inputs()
    plain, guided, rows = seg.forward_paths(x, gi, gm, None, torch.tensor([True, False, True, True]))
    assert plain.shape == (4, 4, 32, 32) and guided.shape == (3, 4, 32, 32) and rows.tolist() == [0, 2, 3]
    guided.square().sum().backward()
    assert all(p.grad is None for p in seg.backbone.parameters())
    assert seg.head_out.weight.grad is not None and float(seg.head_out.weight.grad.abs().sum()) > 0
    seg.zero_grad()
    plain.square().sum().backward()
    assert all(p.grad is None for p in seg.head.parameters())  # and the plain loss never reaches the head


def test_forward_paths_is_the_residual_paths_only():
    seg = GuidedSegmenter(4, k=3, fusion="concat", channels=(8, 16, 32))
    with pytest.raises(ValueError, match="residual"):
        seg.forward_paths(*_inputs()[:3])


def test_config_validates_the_head():
    assert JRASConfig().segmenter.guide_path == "residual"
    with pytest.raises(ConfigError, match="guide_path"):
        JRASConfig().with_overrides({"segmenter.guide_path": "side"})
    with pytest.raises(ConfigError, match="head_channels"):
        JRASConfig().with_overrides({"segmenter.head_channels": [8]})


@pytest.mark.slow
def test_residual_training_learns_both_paths(tiny_data):
    train, val = tiny_data
    cfg = JRASConfig().with_overrides({**TINY, "contrastive.steps_per_epoch": 2, "retrieval.guide_dropout": 0.0,
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
def test_a_site_drops_guides_that_hurt_on_its_support_cases(tiny_data):
    from jras_core.retrieval.bank import RetrievalBank
    from jras_core.training.adapt import choose_guides

    train, support = tiny_data
    cfg = JRASConfig().with_overrides({**TINY, "segmenter.guide_path": "residual", "adapt.guides": "auto"})
    model = build_model(cfg)
    JRASTrainer(model, cfg, train).fit(3)
    bank = RetrievalBank(support, cfg.labels.num_classes)
    bank.refresh(model.retr)
    with torch.no_grad():  # a head that wrecks every guided prediction
        model.seg.head_out.bias.copy_(torch.tensor([50.0, -50.0, -50.0, -50.0]))
    choice = choose_guides(model, support, cfg, bank)
    assert not choice.use_guides and choice.dice_guided < choice.dice_noguide
    with torch.no_grad():  # guided = guide-free: a tie keeps the guides
        model.seg.head_out.weight.zero_()
        model.seg.head_out.bias.zero_()
    assert choose_guides(model, support, cfg, bank).use_guides
    assert not choose_guides(model, support, cfg.with_overrides({"adapt.guides": "never"}), bank).use_guides
    always = choose_guides(model, support, cfg.with_overrides({"adapt.guides": "always"}), bank)
    assert always.use_guides and always.dice_guided != always.dice_guided  # nan: nothing predicted
    plain = evaluate(model, support, cfg, bank, diagnostics=False, use_guides=False)
    assert plain["guides_used"] == 0.0
    assert plain["dice_mean"] == pytest.approx(evaluate(model, support, cfg, bank)["dice_noguide"])


@pytest.mark.slow
def test_refine_cascade_is_the_residual_head_without_guides(tiny_data):
    train, val = tiny_data
    cfg = JRASConfig().with_overrides({**TINY, "segmenter.fusion": "none", "segmenter.refine": True})
    model = build_model(cfg)
    seg = model.seg
    assert seg.residual and not seg.uses_guides and not cfg.uses_retrieval
    x = torch.rand(3, 1, 32, 32)
    seg.eval()
    assert torch.allclose(seg(x), seg.backbone(x), atol=1e-6)  # the head starts at zero
    plain = build_model(cfg.with_overrides({"segmenter.refine": False})).seg
    assert plain.head is None and not plain.residual
    trainer = JRASTrainer(model, cfg, train)
    head_before = seg.head_out.weight.detach().clone()
    trainer.fit(2)
    assert not torch.equal(head_before, seg.head_out.weight)  # the cascade's head trained
    seg.eval()
    with torch.no_grad():
        assert not torch.allclose(seg(x), seg.backbone(x), atol=1e-4)
    assert 0.0 <= evaluate(model, val, cfg)["dice_mean"] <= 1.0
