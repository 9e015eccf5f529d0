"""Losses: Dice + cross-entropy for the segmenter, soft InfoNCE for the retriever."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss
from torch import nn


def segmentation_loss() -> nn.Module:
    """Dice + cross-entropy on logits ``(B, C, H, W)`` and labels ``(B, 1, H, W)``."""
    return DiceCELoss(to_onehot_y=True, softmax=True)


def per_sample_dice_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Dice + cross-entropy of each sample, ``(B,)`` (no reduction over the batch): MONAI's
    soft Dice per sample and class (``reduction="none"``), averaged over the classes, plus the
    sample's mean pixel cross-entropy.

    Args:
        logits: ``(B, C, H, W)``; labels: ``(B, H, W)`` integer labels.
    """
    ce = F.cross_entropy(logits, labels, reduction="none").mean(dim=(1, 2))
    dice = _PER_SAMPLE_DICE(logits, labels.unsqueeze(1)).flatten(1).mean(dim=1)
    return ce + dice


_PER_SAMPLE_DICE = DiceLoss(to_onehot_y=True, softmax=True, reduction="none")
"""``(B, C, 1, 1)`` soft Dice loss of each sample and class (smoothing 1e-5 above and below)."""


def soft_info_nce(sims: torch.Tensor, relevance: torch.Tensor, tau: float, tau_relevance: float,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy between softmax(relevance / tau_r) and softmax(sims / tau).

    Args:
        sims: ``(B, M)`` retriever similarities of each query to its M candidates.
        relevance: ``(B, M)`` how much each candidate helps (higher is better).
        valid: ``(B, M)`` bool; invalid candidates are left out of both softmaxes.

    Returns:
        scalar loss, mean over queries.
    """
    if valid is not None:
        sims = sims.masked_fill(~valid, float("-inf"))
        relevance = relevance.masked_fill(~valid, float("-inf"))
    target = torch.softmax(relevance / tau_relevance, dim=1)
    log_p = torch.log_softmax(sims / tau, dim=1)
    log_p = log_p.masked_fill(target == 0, 0.0)
    return -(target * log_p).sum(dim=1).mean()
