"""Method levers that are configuration options: retriever pooling grid and
zero-initialised guide inputs."""

from __future__ import annotations

import pytest
import torch

from jras_core.config import ConfigError, JRASConfig
from jras_core.data.synthetic import generate_volumes
from jras_core.models.jras import build_model

BASE = {"preprocess.size": 32, "segmenter.channels": [4, 8, 16], "retriever.channels": [4, 8, 8],
        "retriever.embed_dim": 16}
INPUT_PATH = {"segmenter.guide_path": "input"}
"""The levers of the input guide path (guides as extra channels of the backbone's input)."""


def _bank_inputs(num_classes: int = 4) -> torch.Tensor:
    """``(N, 1 + C_fg, 32, 32)``: distinct synthetic slices with their one-hot masks."""
    from jras_core.data.slices import build_slice_set
    from jras_core.labels import one_hot_fg

    cfg = JRASConfig().with_overrides({"preprocess.size": 32})
    vols = generate_volumes("A", 3, seed=4, size=32)
    slices = build_slice_set(vols, cfg.preprocess, num_classes)
    return torch.cat([slices.images, one_hot_fg(slices.masks, num_classes)], dim=1)


@pytest.mark.parametrize("grid", [1, 4])
def test_pool_grid_spreads_initial_embeddings(grid):
    cfg = JRASConfig().with_overrides({**BASE, "retriever.pool_grid": grid})
    model = build_model(cfg).eval()
    with torch.no_grad():
        emb = model.retr(_bank_inputs())
    cos = emb @ emb.T
    assert emb.shape[1] == 16 and torch.allclose(emb.norm(dim=1), torch.ones(len(emb)), atol=1e-5)
    # a global average of instance-normalised features maps every slice to nearly one point
    if grid == 1:
        assert cos.min() > 0.98
    else:
        assert cos.min() < 0.95


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


def test_lever_options_are_validated():
    with pytest.raises(ConfigError, match="pool_grid"):
        JRASConfig().with_overrides({"retriever.pool_grid": 0})
    with pytest.raises(ConfigError, match="guide_init"):
        JRASConfig().with_overrides({"segmenter.guide_init": "ones"})
    with pytest.raises(ConfigError, match="norm"):
        JRASConfig().with_overrides({"segmenter.norm": "layer"})


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
