"""The retriever: a small CNN encoder with a projection head to a unit sphere."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn


class Retriever(nn.Module):
    """Embed an image (optionally with a mask or prediction) for nearest-neighbour retrieval.

    Args:
        in_channels: 1 for the image alone, ``1 + C_fg`` for image plus foreground
            class maps (a true mask one-hot for bank entries, a pass-1 softmax for queries).
        embed_dim: dimension ``d`` of the embedding.
        channels: encoder widths; each level halves the resolution.
        pool_grid: the last feature map is averaged to a ``pool_grid x pool_grid`` grid
            that the head sees whole (1: global average). Instance-normalised features
            averaged over the whole image are nearly the same for every image (each channel
            has zero mean before its ReLU), so a global average starts with all embeddings
            close together; a grid keeps where the structures are.

    ``forward``: ``(B, in_channels, H, W)`` -> ``(B, embed_dim)``, L2-normalised.
    """

    def __init__(self, in_channels: int, embed_dim: int = 128, channels: Sequence[int] = (16, 32, 64, 64),
                 pool_grid: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for ch in channels:
            layers.append(Convolution(2, prev, ch, strides=2, kernel_size=3, norm="instance", act="relu"))
            layers.append(Convolution(2, ch, ch, strides=1, kernel_size=3, norm="instance", act="relu"))
            prev = ch
        self.encoder = nn.Sequential(*layers)
        self.pool_grid = int(pool_grid)
        flat = prev * self.pool_grid**2
        self.head = nn.Sequential(nn.Linear(flat, prev), nn.ReLU(inplace=True), nn.Linear(prev, embed_dim))
        self.in_channels = in_channels
        self.embed_dim = embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.encoder(x)
        if self.pool_grid == 1:
            feats = fmap.mean(dim=(2, 3))
        else:
            feats = F.adaptive_avg_pool2d(fmap, self.pool_grid).flatten(1)
        return F.normalize(self.head(feats), dim=1)
