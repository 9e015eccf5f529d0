"""Dice and HD95 per class, per slice and per volume, computed by MONAI."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_dice, compute_hausdorff_distance

from jras_core.data.slices import SliceSet


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, *spatial)`` labels -> ``(B, C, *spatial)`` float one-hot."""
    return F.one_hot(labels.long(), num_classes).movedim(-1, 1).float()


def dice_per_class(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Foreground Dice of each sample and class.

    Args:
        pred, target: ``(B, *spatial)`` integer labels (2-D slices or 3-D volumes).

    Returns:
        ``(B, C-1)``; NaN where the class is absent from both prediction and target.
    """
    return compute_dice(
        _one_hot(pred, num_classes), _one_hot(target, num_classes), include_background=False, ignore_empty=True
    )


def hd95_per_class(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, spacing: tuple[float, ...] | None = None
) -> torch.Tensor:
    """95th-percentile Hausdorff distance in mm of each sample and class.

    Args:
        pred, target: ``(B, *spatial)`` integer labels.
        spacing: voxel size in mm (one for the batch).

    Returns:
        ``(B, C-1)``. A structure present on one side only (missed or hallucinated)
        scores the image diagonal in mm, the largest distance possible; NaN where the
        class is absent from both.
    """
    pred_oh, target_oh = _one_hot(pred, num_classes), _one_hot(target, num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(pred_oh, target_oh, include_background=False, percentile=95, spacing=spacing)
    spatial = pred.shape[1:]
    sp = spacing if spacing is not None else (1.0,) * len(spatial)
    diagonal = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(spatial, sp))))
    dims = tuple(range(2, pred_oh.dim()))
    in_pred = pred_oh[:, 1:].sum(dim=dims) > 0
    in_target = target_oh[:, 1:].sum(dim=dims) > 0
    hd = torch.where(in_pred ^ in_target, torch.full_like(hd, diagonal), hd)
    return torch.where(in_pred | in_target, hd, torch.full_like(hd, float("nan")))


def volume_metrics(pred: torch.Tensor, slices: SliceSet, num_classes: int, hd95: bool = True) -> dict[str, np.ndarray]:
    """Dice and HD95 of every volume, slices stacked back in their order.

    Args:
        pred: ``(N, S, S)`` predicted labels for the ``N`` slices of ``slices``.
        hd95: also the HD95 (the costlier of the two); off: Dice only.

    Returns:
        ``{"dice": (V, C-1), "hd95": (V, C-1)}`` over the volumes present, in mm
        (``"dice"`` only when ``hd95`` is off).
    """
    dices, hds = [], []
    for v, idx in slices.volume_rows():
        p = pred[idx].permute(1, 2, 0).unsqueeze(0)  # (1, H, W, Z)
        t = slices.masks[idx].long().permute(1, 2, 0).unsqueeze(0)
        spacing = slices.volumes[v].spacing
        dices.append(dice_per_class(p, t, num_classes)[0])
        if hd95:
            hds.append(hd95_per_class(p, t, num_classes, spacing=tuple(spacing))[0])
    out = {"dice": torch.stack(dices).numpy()}
    if hd95:
        out["hd95"] = torch.stack(hds).numpy()
    return out


def summarise(values: np.ndarray, class_names: list[str], prefix: str) -> dict[str, float]:
    """Mean over samples per class (NaN ignored) and over classes: ``{prefix}_{name}`` and ``{prefix}_mean``."""
    out: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        per_class = np.nanmean(values, axis=0) if len(values) else np.full(len(class_names), np.nan)
    for name, v in zip(class_names, per_class):
        out[f"{prefix}_{name.lower()}"] = float(v)
    finite = [v for v in per_class if not math.isnan(v)]
    out[f"{prefix}_mean"] = float(np.mean(finite)) if finite else float("nan")
    return out
