"""Batched guide operations: centroids, centroid alignment, mask similarity.

All functions work on whole batches (no per-sample Python loops).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jras_core.labels import one_hot_fg


def centroids(fg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground centroid of each map in normalised coordinates ``[-1, 1]``.

    Args:
        fg: ``(B, H, W)`` non-negative foreground weight (a binary mask or a probability).

    Returns:
        ``(B, 2)`` centroid ``(x, y)`` and ``(B,)`` bool, True where the map has foreground.
    """
    b, h, w = fg.shape
    ys = torch.linspace(-1.0, 1.0, h, dtype=fg.dtype, device=fg.device)
    xs = torch.linspace(-1.0, 1.0, w, dtype=fg.dtype, device=fg.device)
    mass = fg.sum(dim=(1, 2))
    cy = (fg.sum(dim=2) * ys).sum(dim=1) / mass.clamp_min(1e-6)
    cx = (fg.sum(dim=1) * xs).sum(dim=1) / mass.clamp_min(1e-6)
    return torch.stack([cx, cy], dim=1), mass > 0.5


def translation_grid(offsets: torch.Tensor, h: int, w: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sampling grid of a pure translation, as ``F.affine_grid`` builds it (``align_corners=True``)
    but without its per-pixel matrix product: the identity grid minus each offset.

    Args:
        offsets: ``(B, 2)`` shift ``(dx, dy)`` in normalised units.
        h, w: output size.

    Returns:
        ``(B, h, w, 2)`` grid of ``(x, y)`` sampling positions for ``F.grid_sample``.
    """
    xs = torch.linspace(-1.0, 1.0, w, dtype=dtype, device=offsets.device)
    ys = torch.linspace(-1.0, 1.0, h, dtype=dtype, device=offsets.device)
    off = offsets.to(dtype)
    grid = torch.empty(off.shape[0], h, w, 2, dtype=dtype, device=offsets.device)
    # x and y written one at a time (twice as fast as one broadcast over the last axis of 2)
    grid[..., 0] = xs.view(1, 1, w) - off[:, 0].view(-1, 1, 1)
    grid[..., 1] = ys.view(1, h, 1) - off[:, 1].view(-1, 1, 1)
    return grid


def similarity_grid(
    target: torch.Tensor, source: torch.Tensor, scale: torch.Tensor, h: int, w: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Sampling grid that moves point ``source`` to ``target`` and magnifies about it by ``scale``
    (``align_corners=True`` convention): output position ``p`` samples ``(p - target) / scale +
    source``. With ``scale`` 1 it is :func:`translation_grid` of ``target - source``.

    Args:
        target, source: ``(B, 2)`` points ``(x, y)`` in normalised units.
        scale: ``(B,)`` magnification (above 1 enlarges the content).

    Returns:
        ``(B, h, w, 2)`` grid of ``(x, y)`` sampling positions for ``F.grid_sample``.
    """
    xs = torch.linspace(-1.0, 1.0, w, dtype=dtype, device=target.device)
    ys = torch.linspace(-1.0, 1.0, h, dtype=dtype, device=target.device)
    t, src, inv = target.to(dtype), source.to(dtype), 1.0 / scale.to(dtype)
    grid = torch.empty(t.shape[0], h, w, 2, dtype=dtype, device=target.device)
    grid[..., 0] = (xs.view(1, 1, w) - t[:, 0].view(-1, 1, 1)) * inv.view(-1, 1, 1) + src[:, 0].view(-1, 1, 1)
    grid[..., 1] = (ys.view(1, h, 1) - t[:, 1].view(-1, 1, 1)) * inv.view(-1, 1, 1) + src[:, 1].view(-1, 1, 1)
    return grid


def translate(images: torch.Tensor, offsets: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Shift each image by ``offsets`` (normalised units; +x moves content right).

    Args:
        images: ``(B, C, H, W)``.
        offsets: ``(B, 2)`` shift ``(dx, dy)`` in ``[-2, 2]``.
        mode: ``bilinear`` for images, ``nearest`` for label maps.
    """
    grid = translation_grid(offsets, images.shape[-2], images.shape[-1], images.dtype)
    return F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=True)


def align_guides(
    guide_images: torch.Tensor,
    guide_masks: torch.Tensor,
    target_centroid: torch.Tensor,
    target_valid: torch.Tensor,
    guide_centroids: tuple[torch.Tensor, torch.Tensor] | None = None,
    scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift every guide so that its foreground centroid lands on the query's centroid (and,
    with ``scales``, magnify it about that centroid).

    Args:
        guide_images: ``(B, K, 1, H, W)``.
        guide_masks: ``(B, K, H, W)`` integer labels.
        guide_centroids: the guides' own foreground centroids ``(B, K, 2)`` and which
            guides have foreground ``(B, K)``, when known (:meth:`RetrievalBank.centroids_at`);
            computed from ``guide_masks`` otherwise.
        target_centroid: ``(B, 2)`` the query's (predicted) centroid.
        target_valid: ``(B,)`` bool; guides of queries without a centroid are left in place.
        scales: ``(B, K)`` magnification of each guide about the query's centroid (1: none);
            ignored for guides left in place.

    Returns:
        shifted guide images and masks (``guide_masks``' dtype), same shapes.
    """
    b, k, _, h, w = guide_images.shape
    if guide_centroids is None:
        g_cent, g_valid = centroids((guide_masks > 0).flatten(0, 1).float())
    else:
        g_cent, g_valid = guide_centroids[0].reshape(b * k, 2), guide_centroids[1].reshape(b * k)
    target = target_centroid.repeat_interleave(k, dim=0)
    ok = (g_valid & target_valid.repeat_interleave(k)).unsqueeze(1)
    if scales is None:
        offsets = torch.where(ok, target - g_cent, torch.zeros_like(target))
        grid = translation_grid(offsets, h, w, guide_images.dtype)  # one grid for images and masks
    else:
        scale = torch.where(ok.squeeze(1), scales.reshape(b * k), torch.ones_like(scales.reshape(b * k)))
        grid = similarity_grid(torch.where(ok, target, g_cent), g_cent, scale, h, w, guide_images.dtype)
    images = F.grid_sample(guide_images.reshape(b * k, 1, h, w), grid, align_corners=True)
    masks = F.grid_sample(guide_masks.reshape(b * k, 1, h, w).to(grid.dtype), grid, mode="nearest", align_corners=True)
    return images.reshape(b, k, 1, h, w), masks.reshape(b, k, h, w).round().to(guide_masks.dtype)


def centred_one_hot(masks: torch.Tensor, num_classes: int, size: int = 32, chunk: int = 256) -> torch.Tensor:
    """Foreground one-hot maps shifted to the image centre and pooled to ``size``.

    The flattened result is the key of the appearance-free mask ranking: the Dice of
    two centred masks is a matrix product (:func:`centred_dice`).

    Args:
        masks: ``(N, H, W)`` labels, or ``(N, C_fg, H, W)`` soft foreground maps.
        chunk: maps processed at a time (bounds the full-resolution temporaries).

    Returns:
        ``(N, C_fg, size, size)`` float32.
    """
    out = []
    for start in range(0, masks.shape[0], chunk):
        part = masks[start : start + chunk]
        fg = one_hot_fg(part, num_classes) if part.dim() == 3 else part.float()
        cent, valid = centroids(fg.sum(dim=1))
        offsets = torch.where(valid.unsqueeze(1), -cent, torch.zeros_like(cent))
        out.append(F.adaptive_avg_pool2d(translate(fg, offsets), size))
    if not out:
        c_fg = num_classes - 1 if masks.dim() == 3 else masks.shape[1]
        return masks.new_zeros((0, c_fg, size, size), dtype=torch.float32)
    return torch.cat(out)


def centred_dice(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Class-mean soft Dice ``2<a,b> / (|a|^2 + |b|^2)`` between every pair of centred maps
    (1 for identical maps, also where interpolation made them soft).

    Args:
        a: ``(Q, C_fg, s, s)`` and b: ``(N, C_fg, s, s)`` from :func:`centred_one_hot`.

    Returns:
        ``(Q, N)`` Dice, averaged over the classes present in either map.
    """
    af = a.flatten(2).transpose(0, 1)  # (C, Q, P)
    bf = b.flatten(2).transpose(0, 1)  # (C, N, P)
    inter = torch.bmm(af, bf.transpose(1, 2))  # (C, Q, N)
    sa = af.pow(2).sum(-1).unsqueeze(2)
    sb = bf.pow(2).sum(-1).unsqueeze(1)
    return _class_mean_dice(inter, sa + sb, eps, dim=0)


def centred_dice_pairs(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """:func:`centred_dice` of each query with its own candidates only.

    Args:
        a: ``(Q, C_fg, s, s)`` centred query maps.
        b: ``(Q, M, C_fg, s, s)`` centred maps of each query's M candidates.

    Returns:
        ``(Q, M)`` Dice, equal to ``centred_dice(a, bank)`` gathered at the candidates.
    """
    af = a.flatten(2).unsqueeze(1)  # (Q, 1, C, P)
    bf = b.flatten(3)  # (Q, M, C, P)
    inter = (af * bf).sum(-1)  # (Q, M, C)
    denom = af.pow(2).sum(-1) + bf.pow(2).sum(-1)
    return _class_mean_dice(inter, denom, eps, dim=-1)


def _class_mean_dice(inter: torch.Tensor, denom: torch.Tensor, eps: float, dim: int) -> torch.Tensor:
    """``2 inter / denom`` averaged over the class axis ``dim``, counting only classes
    present in either map (``denom > eps``)."""
    dice = 2 * inter / denom.clamp_min(eps)
    present = (denom > eps).float()
    return (dice * present).sum(dim) / present.sum(dim).clamp_min(1.0)
