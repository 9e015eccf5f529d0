"""Tests of jras_core.models.segmenter: guide paths, fusions, appearance prior, norms."""

from __future__ import annotations

import pytest
import torch
from tiny_methods import BASE, INPUT_PATH_DROPOUT, TINY16

from jras_core.config import JRASConfig
from jras_core.data.synthetic import generate_volumes
from jras_core.models.jras import build_model
from jras_core.models.segmenter import GuidedSegmenter
from jras_core.training import JRASTrainer, evaluate

INPUT_PATH = {"segmenter.guide_path": "input"}
"""The levers of the input guide path (guides as extra channels of the backbone's input)."""


def _inputs(b=4, size=32, k=3, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 1, size, size, generator=g), torch.rand(b, k, 1, size, size, generator=g),
            torch.randint(0, classes, (b, k, size, size), generator=g), torch.rand(b, k, generator=g))


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


@pytest.mark.slow
def test_refine_cascade_is_the_residual_head_without_guides(tiny_data):
    train, val = tiny_data
    cfg = JRASConfig().with_overrides({**TINY16, "segmenter.fusion": "none", "segmenter.refine": True})
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


@pytest.mark.parametrize("backbone", ["unet", "segformer"])
def test_forward_without_guides_equals_the_zero_padded_input(backbone):
    cfg = JRASConfig().with_overrides({"preprocess.size": 32, "segmenter.backbone": backbone,
                                       "segmenter.channels": [8, 16, 32], **INPUT_PATH_DROPOUT})
    seg = build_model(cfg).seg.train()
    x = torch.rand(4, 1, 32, 32)
    absent = torch.zeros(4, dtype=torch.bool)
    out = seg(x, torch.rand(4, 3, 1, 32, 32), torch.randint(0, 4, (4, 3, 32, 32)), None, absent)
    assert seg._query_channel_exact is True
    full = seg.backbone(torch.cat([x, torch.zeros(4, seg.in_channels - 1, 32, 32)], dim=1))
    # equal up to the float rounding of the convolution kernels, which differs between CPUs
    torch.testing.assert_close(out, full, rtol=1e-4, atol=1e-5)
    # gradients reach the query-channel weights of the input layers, as with the full input
    out.square().mean().backward()
    first = seg._input_layers()[0][1]
    assert first.weight.grad is not None and first.weight.grad[:, :1].abs().sum() > 0
    assert torch.count_nonzero(first.weight.grad[:, 1:]) == 0


def test_forward_without_guides_falls_back_when_the_shortcut_differs(monkeypatch):
    cfg = JRASConfig().with_overrides({"preprocess.size": 32, "segmenter.channels": [8, 16, 32], **INPUT_PATH_DROPOUT})
    seg = build_model(cfg).seg.eval()
    monkeypatch.setattr(seg, "_query_channel_forward", lambda image: torch.zeros(len(image), 4, 32, 32))
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        out = seg.forward_without_guides(x)
        full = seg.backbone(torch.cat([x, torch.zeros(2, seg.in_channels - 1, 32, 32)], dim=1))
    assert seg._query_channel_exact is False and torch.equal(out, full)


@pytest.mark.parametrize("backbone", ["unet", "segformer"])
def test_zero_guide_init_starts_as_the_plain_segmenter(backbone):
    cfg = JRASConfig().with_overrides({**BASE, **INPUT_PATH, "segmenter.backbone": backbone,
                                       "segmenter.guide_init": "zero"})
    model = build_model(cfg).eval()
    x = torch.randn(2, 1, 32, 32)
    guides = torch.randn(2, 3, 1, 32, 32), torch.randint(0, 4, (2, 3, 32, 32))
    with torch.no_grad():
        with_guides = model.seg(x, *guides, None, torch.ones(2, dtype=torch.bool))
        without = model.seg(x, guide_present=torch.zeros(2, dtype=torch.bool))
    # equal up to the float rounding of the 17- and 1-channel convolution kernels
    assert torch.allclose(with_guides, without, rtol=0.0, atol=1e-6)
    # the guide weights are trainable: one step moves them off zero
    model.train()
    loss = model.seg(x, *guides, None, torch.ones(2, dtype=torch.bool)).square().mean()
    loss.backward()
    grads = [m.weight.grad[:, 1:].abs().sum() for m in model.seg.backbone.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.weight.grad is not None
             and m.weight.shape[1] == model.seg.in_channels]
    assert grads and max(grads) > 0
    default = build_model(cfg.with_overrides({"segmenter.guide_init": "default"})).eval()
    with torch.no_grad():
        assert not torch.equal(default.seg(x, *guides, None, torch.ones(2, dtype=torch.bool)),
                               default.seg(x, guide_present=torch.zeros(2, dtype=torch.bool)))


@pytest.mark.parametrize("guide_path", ["residual", "input"])
def test_instance_norm_segments_each_slice_by_itself(guide_path):
    from federation.protocol import local_keys
    from jras_core.training.adapt import recalibrate_norm

    cfg = JRASConfig().with_overrides({**BASE, "segmenter.guide_path": guide_path, "segmenter.norm": "instance",
                                       "segmenter.fusion": "feature"})
    model = build_model(cfg)
    kinds = {type(m).__name__ for m in model.seg.modules()}
    assert "InstanceNorm2d" in kinds and "BatchNorm2d" not in kinds
    # in training mode too, a slice's logits do not depend on the slices it is batched with
    model.train()
    x = torch.randn(3, 1, 32, 32)
    guides = torch.rand(3, 3, 1, 32, 32), torch.randint(0, 4, (3, 3, 32, 32))
    present = torch.ones(3, dtype=torch.bool)
    with torch.no_grad():
        batch = model.seg(x, *guides, None, present)
        alone = model.seg(x[:1], guides[0][:1], guides[1][:1], None, present[:1])
    assert torch.allclose(batch[:1], alone, atol=1e-5)
    # FedBN keeps the learned scale and shift local; AdaBN has nothing to re-estimate
    local = local_keys(model, keep_norm_local=True, keep_retriever_local=False)
    assert any(k.startswith("seg.") and k.endswith(".weight") for k in local)
    bn = build_model(cfg.with_overrides({"segmenter.norm": "batch"})).train()
    with torch.no_grad():
        assert not torch.allclose(bn.seg(x, *guides, None, present)[:1],
                                  bn.seg(x[:1], guides[0][:1], guides[1][:1], None, present[:1]), atol=1e-5)
    from jras_core.data.slices import build_slice_set
    slices = build_slice_set(generate_volumes("A", 1, seed=1, size=32), cfg.preprocess, 4)
    seg_layers = recalibrate_norm(model, slices, cfg.with_overrides({"segmenter.fusion": "none"}))
    retr_only = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.retr.modules())
    assert seg_layers == retr_only


def test_appearance_prior_reads_tissue_intensities_off_the_guides():
    from jras_core.models.segmenter import appearance_prior

    masks = torch.zeros(1, 2, 8, 8, dtype=torch.long)
    masks[:, :, 2:4] = 1
    masks[:, :, 5:7] = 2
    # scanner 1: class 1 bright, class 2 dark; scanner 2: the contrast order reversed
    for bright, dark in ((1, 2), (2, 1)):
        guides = torch.full((1, 2, 1, 8, 8), 0.5) + 0.01 * torch.randn(1, 2, 1, 8, 8)
        guides[:, :, 0][masks == bright] = 0.9
        guides[:, :, 0][masks == dark] = 0.1
        query = torch.tensor([0.9, 0.1, 0.5, 0.5]).view(1, 1, 2, 2)
        prior = appearance_prior(query, guides, masks, num_classes=4)
        assert prior.shape == (1, 4, 2, 2)
        torch.testing.assert_close(prior.sum(1), torch.ones(1, 2, 2))
        assert prior[0, :, 0, 0].argmax() == bright and prior[0, :, 0, 1].argmax() == dark
        assert prior[0, :, 1, 0].argmax() == 0
        assert prior[0, 3].max() == 0  # class 3 appears in no guide


def test_appearance_prior_fits_the_class_statistics_of_all_guides():
    from jras_core.models.segmenter import appearance_prior

    gen = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 3, (2, 3, 6, 6), generator=gen)  # class 3 absent
    guides = torch.rand(2, 3, 1, 6, 6, generator=gen)
    query = torch.rand(2, 1, 6, 6, generator=gen)
    prior = appearance_prior(query, guides, masks, num_classes=4, min_std=0.05)
    for b in range(2):
        pixels, labels = guides[b].flatten(), masks[b].flatten()
        loglik = []
        for c in range(3):  # one Gaussian per class over the pixels of all K guides
            values = pixels[labels == c].double()
            var = values.var(unbiased=False) + 0.05**2
            loglik.append(-(query[b, 0].double() - values.mean()) ** 2 / (2 * var) - 0.5 * var.log())
        expected = torch.softmax(torch.stack(loglik), dim=0)
        torch.testing.assert_close(prior[b, :3].double(), expected, atol=1e-5, rtol=1e-4)
        assert prior[b, 3].max() == 0


def test_concat_guide_channels_hold_guides_one_hot_masks_and_prior_in_order():
    from jras_core.labels import one_hot_fg
    from jras_core.models.segmenter import appearance_prior

    cfg = JRASConfig().with_overrides({**BASE, **INPUT_PATH, "segmenter.appearance": True})
    seg = build_model(cfg).seg
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 16, 16, generator=gen)
    images = torch.rand(2, 3, 1, 16, 16, generator=gen)
    masks = torch.randint(0, 4, (2, 3, 16, 16), generator=gen, dtype=torch.uint8)
    extra = seg.guide_channels(x, images, masks)
    assert extra.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(extra[:, :3], images.flatten(1, 2))
    assert torch.equal(extra[:, 3:12], one_hot_fg(masks, 4).flatten(1, 2))
    torch.testing.assert_close(extra[:, 12:], appearance_prior(x, images, masks, 4))
    # written into a given tensor: the same channels
    out = torch.full((2, seg.in_channels - 1, 16, 16), float("nan"))
    assert seg.guide_channels(x, images, masks, out=out) is out
    assert torch.equal(out, extra)


def test_appearance_channels_are_part_of_the_guides():
    cfg = JRASConfig().with_overrides({**BASE, **INPUT_PATH, "segmenter.appearance": True})
    model = build_model(cfg).eval()
    plain = build_model(cfg.with_overrides({"segmenter.appearance": False}))
    assert model.seg.in_channels == plain.seg.in_channels + 4
    x = torch.rand(2, 1, 32, 32)
    guides = torch.rand(2, 3, 1, 32, 32), torch.randint(0, 4, (2, 3, 32, 32))
    extra = model.seg.guide_channels(x, *guides)
    assert extra.shape == (2, model.seg.in_channels - 1, 32, 32)
    torch.testing.assert_close(extra[:, -4:].sum(1), torch.ones(2, 32, 32))
    with torch.no_grad():  # guide dropout removes the appearance channels with the guides
        dropped = model.seg(x, *guides, None, torch.zeros(2, dtype=torch.bool))
        assert torch.equal(dropped, model.seg(x))
