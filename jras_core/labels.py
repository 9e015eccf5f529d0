"""Label maps: the encodings of segmentation masks that models, guides and losses share."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def one_hot_fg(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Foreground one-hot maps.

    Args:
        masks: ``(..., H, W)`` integer labels ``0..num_classes-1`` (fastest as uint8).

    Returns:
        ``(..., num_classes-1, H, W)`` float32 (background channel dropped).
    """
    out = torch.empty(*masks.shape[:-2], num_classes - 1, *masks.shape[-2:], device=masks.device)
    for c in range(1, num_classes):  # one comparison with a scalar per class, written in place
        torch.eq(masks, c, out=out[..., c - 1, :, :])
    return out


def label_ids(names: Sequence[str]) -> dict[str, int]:
    """Label id of every foreground class name of a label set (``labels.names``): class
    ``names[i]`` is label ``i + 1`` (0 is background). Names are keyed upper-cased and
    stripped, so lookups are case-insensitive."""
    return {n.strip().upper(): i + 1 for i, n in enumerate(names)}
