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
        input_size: when set, every input is resampled by area averaging to
            ``input_size x input_size`` before the encoder (bank entries and queries alike,
            since both pass through ``forward``): at half the slice size the encoder's
            cost falls about fourfold. None: the input's own size.

    Each convolution is followed by instance normalisation (without affine parameters),
    computed as a group norm with one group per channel (the same function; torch's CPU
    group-norm kernels are 2-3x faster than its instance-norm ones), and a ReLU.

    ``forward``: ``(B, in_channels, H, W)`` -> ``(B, embed_dim)``, L2-normalised.
    """

    def __init__(self, in_channels: int, embed_dim: int = 128, channels: Sequence[int] = (16, 32, 64, 64),
                 pool_grid: int = 1, input_size: int | None = None):
        super().__init__()
        if input_size is not None and input_size < 1:
            raise ValueError(f"input_size must be positive, got {input_size}")
        self.input_size = input_size
        layers: list[nn.Module] = []
        prev = in_channels
        for ch in channels:
            norm = ("group", {"num_groups": ch, "affine": False})
            act = ("relu", {"inplace": True})
            layers.append(Convolution(2, prev, ch, strides=2, kernel_size=3, norm=norm, act=act))
            layers.append(Convolution(2, ch, ch, strides=1, kernel_size=3, norm=norm, act=act))
            prev = ch
        self.encoder = nn.Sequential(*layers)
        self.pool_grid = int(pool_grid)
        flat = prev * self.pool_grid**2
        self.head = nn.Sequential(nn.Linear(flat, prev), nn.ReLU(inplace=True), nn.Linear(prev, embed_dim))
        self.in_channels = in_channels
        self.embed_dim = embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.input_size
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.adaptive_avg_pool2d(x, size)
        fmap = self.encoder(x)
        if self.pool_grid == 1:
            feats = fmap.mean(dim=(2, 3))
        else:
            feats = F.adaptive_avg_pool2d(fmap, self.pool_grid).flatten(1)
        return F.normalize(self.head(feats), dim=1)
