"""The pair of models a site trains and the server aggregates."""

from __future__ import annotations

import torch
from torch import nn

from jras_core.config import JRASConfig
from jras_core.models.retriever import Retriever
from jras_core.models.segmenter import GuidedSegmenter

SEG_PREFIX = "seg."
RETR_PREFIX = "retr."


class JRASModel(nn.Module):
    """Segmenter ``seg`` and retriever ``retr``; ``state_dict`` keys are ``seg.*`` and ``retr.*``."""

    def __init__(self, seg: GuidedSegmenter, retr: Retriever):
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
    in_ch = 1 + (num_classes - 1 if cfg.retriever.input == "image+pred" else 0)
    retr = Retriever(in_ch, cfg.retriever.embed_dim, cfg.retriever.channels, cfg.retriever.pool_grid,
                     input_size=cfg.retriever.input_size)
    return JRASModel(seg, retr)
