"""Tests of jras_core.models.retriever: embeddings, instance norm, pooling grid, input size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_methods import BASE, TINY16

from jras_core.config import JRASConfig
from jras_core.data.synthetic import generate_volumes
from jras_core.models.jras import build_model
from jras_core.models.retriever import Retriever


def test_retriever_norm_is_instance_norm_without_running_stats():
    torch.manual_seed(0)
    retr = Retriever(in_channels=2, embed_dim=8, channels=(4, 8))
    norms = [m for m in retr.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == m.num_channels and not m.affine for m in norms)
    assert not any(getattr(m, "track_running_stats", False) for m in retr.modules())
    assert not any(n.startswith("encoder") and "adn" in n for n in retr.state_dict())  # no norm parameters
    x = torch.rand(3, 2, 32, 32)
    out = retr(x)
    with torch.no_grad():
        h = x
        for conv in [m for m in retr.encoder.modules() if isinstance(m, torch.nn.Conv2d)]:
            h = F.relu(F.instance_norm(conv(h)))
        ref = F.normalize(retr.head(h.mean(dim=(2, 3))), dim=1)
    assert torch.allclose(out, ref, atol=1e-5)


def test_retriever_input_size_resamples_every_input():
    torch.manual_seed(0)
    small = Retriever(in_channels=4, embed_dim=8, channels=(4, 8), input_size=16).eval()
    plain = Retriever(in_channels=4, embed_dim=8, channels=(4, 8)).eval()
    plain.load_state_dict(small.state_dict())  # the option adds no weights
    x = torch.rand(3, 4, 32, 32)
    with torch.no_grad():
        assert torch.allclose(small(x), plain(F.avg_pool2d(x, 2)), atol=1e-6)
        assert torch.equal(small(x[..., ::2, ::2]), plain(x[..., ::2, ::2]))  # already 16 px: unchanged
    with pytest.raises(ValueError):
        Retriever(in_channels=1, input_size=0)


def test_retriever_embeddings_are_unit_norm():
    model = build_model(JRASConfig().with_overrides(TINY16))
    emb = model.retr(torch.rand(5, model.retr.in_channels, 32, 32))
    assert emb.shape == (5, 16)
    assert torch.allclose(emb.norm(dim=1), torch.ones(5), atol=1e-5)
    keys = set(model.state_dict())
    assert keys and all(k.startswith(("seg.", "retr.")) for k in keys)


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
