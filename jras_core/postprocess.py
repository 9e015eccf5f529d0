"""Post-processing of predicted label maps, volume by volume (MONAI transforms)."""

from __future__ import annotations

import torch
from monai.transforms import KeepLargestConnectedComponent
from monai.utils import convert_to_tensor

from jras_core.config import PostprocessConfig
from jras_core.data.slices import SliceSet


def keep_largest_components(pred: torch.Tensor, slices: SliceSet, num_classes: int) -> torch.Tensor:
    """Keep only the largest connected component of each foreground class in each volume.

    The slices of a volume are stacked in their order and labelled in 3-D with
    face connectivity; every other component of a class becomes background.

    Args:
        pred: ``(N, S, S)`` integer labels for the ``N`` slices of ``slices``.
        num_classes: number of classes including background (0).

    Returns:
        ``(N, S, S)`` labels of ``pred``'s dtype.
    """
    if len(pred) != len(slices):
        raise ValueError(f"{len(pred)} predictions for {len(slices)} slices")
    keep = KeepLargestConnectedComponent(applied_labels=list(range(1, num_classes)), independent=True, connectivity=1)
    out = pred.clone()
    for _, idx in slices.volume_rows():
        volume = pred[idx].unsqueeze(0)  # (1, Z, S, S): one channel of labels
        out[idx] = convert_to_tensor(keep(volume), track_meta=False)[0].to(pred.dtype)
    return out


def postprocess(pred: torch.Tensor, slices: SliceSet, cfg: PostprocessConfig, num_classes: int) -> torch.Tensor:
    """``pred`` ``(N, S, S)`` after the steps ``cfg`` turns on (none: returned as is)."""
    if cfg.largest_component:
        pred = keep_largest_components(pred, slices, num_classes)
    return pred
