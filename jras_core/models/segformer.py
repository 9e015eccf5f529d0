"""SegFormer: a Mix Transformer (MiT) encoder with an all-MLP decoder (Xie et al., 2021).

Randomly initialised, 2-D. ``(B, in_channels, H, W)`` -> logits ``(B, out_channels, H, W)``,
``H`` and ``W`` multiples of 32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class OverlapPatchEmbed(nn.Module):
    """Strided convolution patch embedding: ``(B, C, H, W)`` -> tokens ``(B, h*w, D)`` and ``(h, w)``."""

    def __init__(self, in_ch: int, dim: int, patch: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, dim, patch, stride, padding=patch // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention with keys/values spatially reduced by ``sr_ratio``."""

    def __init__(self, dim: int, heads: int, sr_ratio: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio) if sr_ratio > 1 else None
        self.norm = nn.LayerNorm(dim) if sr_ratio > 1 else None

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
        kv_in = x
        if self.sr is not None:
            kv_in = self.sr(x.transpose(1, 2).reshape(b, d, h, w)).flatten(2).transpose(1, 2)
            kv_in = self.norm(kv_in)
        k, v = self.kv(kv_in).view(b, -1, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class MixFFN(nn.Module):
    """MLP with a 3x3 depth-wise convolution (positional information without embeddings)."""

    def __init__(self, dim: int, ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        hidden = dim * ratio
        self.fc1 = nn.Linear(dim, hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = self.fc1(x)
        b, n, c = x.shape
        x = self.dw(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
        return self.fc2(self.drop(F.gelu(x)))


class MiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, sr_ratio: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = EfficientSelfAttention(dim, heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = MixFFN(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), h, w)
        return x + self.ffn(self.norm2(x), h, w)


class SegFormer(nn.Module):
    """SegFormer with a 4-stage MiT encoder (strides 4, 8, 16, 32).

    Args:
        in_channels: input channels.
        out_channels: classes.
        widths: channel width of each stage (1-4 values; missing stages repeat the last width).
        depth: transformer blocks per stage.
        decoder_dim: width of the all-MLP decoder.
    """

    def __init__(self, in_channels: int, out_channels: int, widths: Sequence[int] = (32, 64, 160, 256),
                 depth: int = 1, decoder_dim: int = 64, dropout: float = 0.0):
        super().__init__()
        widths = list(widths)[:4] + [widths[-1]] * (4 - min(len(widths), 4))
        widths = [max(8, (w // 8) * 8) for w in widths]
        heads = [max(1, w // 32) for w in widths]
        srs = [8, 4, 2, 1]
        self.embeds = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.norms = nn.ModuleList()
        prev = in_channels
        for i, w in enumerate(widths):
            self.embeds.append(OverlapPatchEmbed(prev, w, 7 if i == 0 else 3, 4 if i == 0 else 2))
            self.stages.append(nn.ModuleList(MiTBlock(w, heads[i], srs[i], dropout) for _ in range(depth)))
            self.norms.append(nn.LayerNorm(w))
            prev = w
        self.linear = nn.ModuleList(nn.Conv2d(w, decoder_dim, 1) for w in widths)
        self.fuse = nn.Sequential(nn.Conv2d(4 * decoder_dim, decoder_dim, 1, bias=False),
                                  nn.BatchNorm2d(decoder_dim), nn.ReLU(inplace=True))
        self.head = nn.Conv2d(decoder_dim, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        feats = []
        for embed, blocks, norm in zip(self.embeds, self.stages, self.norms):
            t, h, w = embed(x)
            for blk in blocks:
                t = blk(t, h, w)
            x = norm(t).transpose(1, 2).reshape(t.shape[0], -1, h, w)
            feats.append(x)
        top = feats[0].shape[-2:]
        ups = [F.interpolate(lin(f), size=top, mode="bilinear", align_corners=False) for lin, f in zip(self.linear, feats)]
        logits = self.head(self.fuse(torch.cat(ups, dim=1)))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
