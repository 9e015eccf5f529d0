"""The retriever: a small CNN encoder with a projection head to a unit sphere, or a head on
the segmenter's own encoder features (:class:`SharedEncoderRetriever`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

if TYPE_CHECKING:
    from jras_core.models.segmenter import GuidedSegmenter


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

    def embedding_state(self) -> dict[str, torch.Tensor]:
        """Every tensor the embeddings depend on (here the retriever's own state): a bank
        whose entries were embedded under the same values need not embed them again."""
        return self.state_dict()


class SharedEncoderRetriever(nn.Module):
    """A retriever without an encoder of its own: a small head on the segmenter's encoder
    features, pooled over the whole slice and under each foreground class map.

    The segmenter's encoder sees the image alone, so the class maps (the pass-1 prediction of
    a query, the true mask of a bank entry: the same channel layout as :class:`Retriever`'s
    input) enter as pooling weights: the bottleneck features ``(B, F, h, w)`` are averaged
    over the slice (``pool_grid`` as in :class:`Retriever`), and over each class map resampled
    to ``h x w`` (area averaging), which describes each structure as the segmenter sees it;
    the class maps' areas (fractions of the slice) are appended. No convolution runs beyond
    the segmenter's encoder, and that encoder is the segmenter's: it runs in eval mode and
    without gradients (the retriever's training never changes the segmenter), and it is not
    a submodule here, so ``state_dict`` and ``parameters`` hold the head alone (the encoder
    travels and is averaged once, as part of the segmenter).

    Args:
        segmenter: whose backbone encodes (``unet`` or ``dynunet``; see
            :func:`~jras_core.models.backbones.encoder_stages`).
        in_channels: as :class:`Retriever`: 1 (image) or ``1 + C_fg`` (image + class maps).
        embed_dim: dimension ``d`` of the embedding.
        pool_grid: the slice-wide average as a ``pool_grid x pool_grid`` grid.

    ``forward``: ``(B, in_channels, H, W)`` -> ``(B, embed_dim)``, L2-normalised; ``H`` and
    ``W`` are the segmenter's slice size.
    """

    input_size = None
    """Inputs are never resampled: the segmenter's encoder reads slices at their own size."""

    def __init__(self, segmenter: GuidedSegmenter, in_channels: int, embed_dim: int = 128, pool_grid: int = 1):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be positive, got {in_channels}")
        # kept out of the module tree: the encoder's weights belong to the segmenter
        self._segmenter = (segmenter,)
        width = segmenter.encoder_width
        self.pool_grid = int(pool_grid)
        self.num_maps = in_channels - 1
        flat = width * (self.pool_grid**2 + self.num_maps) + self.num_maps
        self.head = nn.Sequential(
            nn.LayerNorm(flat, elementwise_affine=False), nn.Linear(flat, width), nn.ReLU(inplace=True),
            nn.Linear(width, embed_dim),
        )
        self.in_channels = in_channels
        self.embed_dim = embed_dim

    @property
    def segmenter(self) -> GuidedSegmenter:
        return self._segmenter[0]

    @torch.no_grad()
    def features(self, image: torch.Tensor) -> torch.Tensor:
        """The segmenter's bottleneck features ``(B, F, h, w)`` of ``image`` ``(B, 1, H, W)``,
        in eval mode (running statistics, no dropout) and without gradients."""
        backbone = self.segmenter.backbone
        was_training = backbone.training
        backbone.eval()
        try:
            return self.segmenter.encoder_features(image)
        finally:
            backbone.train(was_training)

    def describe(self, feats: torch.Tensor, maps: torch.Tensor | None) -> torch.Tensor:
        """Pooled features ``(B, F * (pool_grid^2 + C_fg) + C_fg)`` of ``feats`` ``(B, F, h, w)``
        under class maps ``maps`` ``(B, C_fg, H, W)`` (None when ``in_channels`` is 1)."""
        feats = feats.float()
        if self.pool_grid == 1:
            parts = [feats.mean(dim=(2, 3))]
        else:
            parts = [F.adaptive_avg_pool2d(feats, self.pool_grid).flatten(1)]
        if maps is not None:
            weights = F.adaptive_avg_pool2d(maps.float(), feats.shape[-2:])  # (B, C_fg, h, w)
            mass = weights.sum(dim=(2, 3))  # (B, C_fg)
            pooled = torch.einsum("bfhw,bjhw->bjf", feats, weights) / mass.clamp_min(1e-3).unsqueeze(2)
            parts += [pooled.flatten(1), mass / weights[0, 0].numel()]
        return torch.cat(parts, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {tuple(x.shape)}")
        maps = x[:, 1:] if self.num_maps else None
        return F.normalize(self.head(self.describe(self.features(x[:, :1]), maps)), dim=1)

    def embedding_state(self) -> dict[str, torch.Tensor]:
        """Every tensor the embeddings depend on: the head's state and the segmenter's backbone
        (weights and running statistics), under ``backbone.*`` keys."""
        state = dict(self.state_dict())
        state.update({f"backbone.{k}": v for k, v in self.segmenter.backbone.state_dict().items()})
        return state


RetrieverModule = Retriever | SharedEncoderRetriever
"""Either retriever: ``(B, in_channels, H, W)`` -> ``(B, d)`` unit embeddings."""
