"""Tests of jras_core.models.backbones: the transformer backbones."""

from __future__ import annotations

import pytest
import torch

from jras_core.models.segmenter import GuidedSegmenter


@pytest.mark.parametrize("backbone", ["swinunetr", "segformer"])
def test_transformer_backbones_shape_and_gradient(backbone):
    seg = GuidedSegmenter(num_classes=4, k=3, fusion="concat", backbone=backbone, channels=(16, 32))
    out = seg(torch.rand(2, 1, 32, 32), torch.rand(2, 3, 1, 32, 32), torch.randint(0, 4, (2, 3, 32, 32)))
    assert out.shape == (2, 4, 32, 32)
    out.mean().backward()
    grads = [p.grad for p in seg.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
