"""The pair of models a site trains and the server aggregates."""

from __future__ import annotations

import torch
from torch import nn

from jras_core.config import JRASConfig
from jras_core.models.backbones import ENCODER_BACKBONES
from jras_core.models.retriever import Retriever, RetrieverModule, SharedEncoderRetriever
from jras_core.models.segmenter import GuidedSegmenter

SEG_PREFIX = "seg."
RETR_PREFIX = "retr."


class JRASModel(nn.Module):
    """Segmenter ``seg`` and retriever ``retr``; ``state_dict`` keys are ``seg.*`` and ``retr.*``."""

    def __init__(self, seg: GuidedSegmenter, retr: RetrieverModule):
        super().__init__()
        self.seg = seg
        self.retr = retr

    @property
    def retriever_uses_prediction(self) -> bool:
        return self.retr.in_channels > 1


def build_model(cfg: JRASConfig) -> JRASModel:
    """Build segmenter and retriever as configured (seeded by ``cfg.train.seed``)."""
    torch.manual_seed(cfg.train.seed)
    num_classes = cfg.labels.num_classes
    seg = GuidedSegmenter(
        num_classes=num_classes,
        k=cfg.retrieval.k,
        fusion=cfg.segmenter.fusion,
        backbone=cfg.segmenter.backbone,
        channels=cfg.segmenter.channels,
        dropout=cfg.segmenter.dropout,
        guide_init=cfg.segmenter.guide_init,
        appearance=cfg.segmenter.appearance,
        guide_path=cfg.segmenter.guide_path,
        head_channels=cfg.segmenter.head_channels,
        refine=cfg.segmenter.refine,
        norm=cfg.segmenter.norm,
    )
    r = cfg.retriever
    in_ch = 1 + (num_classes - 1 if r.input == "image+pred" else 0)
    if r.kind == "shared_encoder":
        if cfg.segmenter.backbone not in ENCODER_BACKBONES:
            raise ValueError(f"retriever.kind shared_encoder needs segmenter.backbone {' or '.join(ENCODER_BACKBONES)}, "
                             f"got {cfg.segmenter.backbone!r}")
        if r.input_size is not None:
            raise ValueError("retriever.kind shared_encoder reads the segmenter's features at the slice size: "
                             f"retriever.input_size must be null, got {r.input_size}")
        retr: RetrieverModule = SharedEncoderRetriever(seg, in_ch, r.embed_dim, r.pool_grid)
    else:
        retr = Retriever(in_ch, r.embed_dim, r.channels, r.pool_grid, input_size=r.input_size)
    return JRASModel(seg, retr)
