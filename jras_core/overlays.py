"""Overlay pictures of label maps on their images, for a person to check a segmentation."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class OverlayPanel:
    """One slice to show: ``image`` ``(H, W)`` intensities, ``labels`` ``(H, W)`` integer
    labels (0: nothing drawn) and a ``title``."""

    image: np.ndarray
    labels: np.ndarray
    title: str


def mid_ventricular_slice(labels: np.ndarray, lv_label: int | None) -> int:
    """Index along Z of the middle slice holding the left ventricle (label ``lv_label``) in a
    ``(H, W, Z)`` label map; without LV voxels (or ``lv_label`` None), the middle of the
    slices with any label, else the middle slice."""
    z = labels.shape[2]
    for present in ((labels == lv_label) if lv_label is not None else None, labels > 0):
        if present is None:
            continue
        rows = np.flatnonzero(present.reshape(-1, z).any(axis=0))
        if rows.size:
            return int(rows[rows.size // 2])
    return z // 2


def overlay_png(panels: Sequence[OverlayPanel], names: Sequence[str], title: str = "") -> bytes:
    """A PNG with one panel per slice: the image in grey, each class in its own colour
    (legend from ``names``: label ``i + 1`` is ``names[i]``).

    Args:
        panels: the slices, each an ``(H, W)`` image and its ``(H, W)`` labels.
        names: foreground class names of the label set.
        title: the figure's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colours = plt.get_cmap("tab10").colors
    cmap = ListedColormap([colours[i % len(colours)] for i in range(len(names))])
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=False):
        lo, hi = np.percentile(panel.image, [1, 99]) if panel.image.size else (0.0, 1.0)
        # array axis 0 across, as viewers show it; intensities windowed to their 1st-99th percentiles
        ax.imshow(panel.image.T, cmap="gray", origin="lower", vmin=lo, vmax=hi)
        shown = np.ma.masked_where(panel.labels.T == 0, panel.labels.T)
        ax.imshow(shown, cmap=cmap, vmin=0.5, vmax=len(names) + 0.5, alpha=0.45, interpolation="nearest",
                  origin="lower")
        ax.set_title(panel.title, fontsize=8)
        ax.axis("off")
    for ax in axes[0][len(panels):]:
        ax.axis("off")
    fig.legend(handles=[Patch(color=cmap(i), label=name) for i, name in enumerate(names)],
               loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


__all__ = ["OverlayPanel", "mid_ventricular_slice", "overlay_png"]
