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


def _bank_inputs(num_classes: int = 4) -> torch.Tensor:
    """``(N, 1 + C_fg, 32, 32)``: distinct synthetic slices with their one-hot masks."""
    from jras_core.data.slices import build_slice_set
    from jras_core.retrieval.guides import one_hot_fg

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
    cfg = JRASConfig().with_overrides({**BASE, "segmenter.backbone": backbone, "segmenter.guide_init": "zero"})
    model = build_model(cfg).eval()
    x = torch.randn(2, 1, 32, 32)
    guides = torch.randn(2, 3, 1, 32, 32), torch.randint(0, 4, (2, 3, 32, 32))
    with torch.no_grad():
        with_guides = model.seg(x, *guides, None, torch.ones(2, dtype=torch.bool))
        without = model.seg(x, guide_present=torch.zeros(2, dtype=torch.bool))
    assert torch.equal(with_guides, without)
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


def test_lever_options_are_validated():
    with pytest.raises(ConfigError, match="pool_grid"):
        JRASConfig().with_overrides({"retriever.pool_grid": 0})
    with pytest.raises(ConfigError, match="guide_init"):
        JRASConfig().with_overrides({"segmenter.guide_init": "ones"})
