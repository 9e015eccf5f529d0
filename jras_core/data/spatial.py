"""In-plane spatial augmentation (flip, rotation, zoom), drawn per sample and applied to a whole batch at once.

Cardiac MRI sources differ in in-plane orientation (the heart can be rotated by about 90
degrees between them) and in field of view; random flips, rotations and zooms teach the
segmenter and the retriever anatomy in any pose.

Every sample of a ``(B, C, H, W)`` batch gets its own draw: one ``2 x 3`` matrix, and the
batch is resampled by one ``affine_grid``/``grid_sample`` call (images bilinear, label maps
nearest neighbour, zero padding). The ``C`` channels of a sample share its transform, and
its label map warps with it.

Conventions. Pixel coordinates are taken about the image centre, ``u = j - (W - 1) / 2``
(column ``j``, increasing rightwards) and ``v = i - (H - 1) / 2`` (row ``i``, increasing
downwards); ``align_corners=False`` normalises them to ``(2 u / W, 2 v / H)``. The
forward change maps an input point ``p = (u, v)`` to ``zoom * R(angle) * F p``: first the
flips ``F``, then the rotation ``R(angle) = [[cos, -sin], [sin, cos]]``, then the isotropic
zoom. On screen (rows going down) a positive angle turns the image clockwise: an angle of
+90 degrees is ``torch.rot90(x, k=-1, dims=(-2, -1))``. A zoom above 1 magnifies. These are
MONAI's ``Affine(rotate_params=radians(angle), scale_params=1 / zoom)`` on a ``(C, H, W)``
image (MONAI writes the same rotation in ``(row, column)`` order and scales the sampling
grid, hence the reciprocal).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from jras_core.config import AugmentConfig


@dataclass
class SpatialDraw:
    """The random parameters of one batch of ``B`` spatial changes.

    ``matrices`` is what the warps use; the other fields record how it was made.
    """

    matrices: torch.Tensor
    """``(B, 2, 3)`` float32 ``affine_grid`` thetas (``align_corners=False``) mapping an output
    pixel's normalised coordinates to the normalised input coordinates it samples, for a
    square slice. The warps correct them for a slice with ``H != W`` (:func:`slice_thetas`), so
    that a rotation stays a rotation in pixels rather than in normalised coordinates."""
    angle: torch.Tensor
    """``(B,)`` float64 rotation in degrees (positive: clockwise on screen)."""
    zoom: torch.Tensor
    """``(B,)`` float64 isotropic zoom (above 1: magnify)."""
    flip_h: torch.Tensor
    """``(B,)`` bool: the sample is flipped along H (upside down) before its rotation."""
    flip_w: torch.Tensor
    """``(B,)`` bool: the sample is flipped along W (left-right) before its rotation."""

    def __len__(self) -> int:
        return self.matrices.shape[0]


def make_spatial_draw(
    angle: torch.Tensor | float,
    zoom: torch.Tensor | float = 1.0,
    flip_h: torch.Tensor | bool = False,
    flip_w: torch.Tensor | bool = False,
    batch: int | None = None,
) -> SpatialDraw:
    """The draw of given parameters: each a ``(B,)`` tensor or a scalar for every sample.

    Args:
        angle: rotation in degrees (positive: clockwise on screen).
        zoom: isotropic zoom, positive (above 1: magnify).
        flip_h: flip along H, applied before the rotation.
        flip_w: flip along W, applied before the rotation.
        batch: ``B`` when every parameter is a scalar.
    """
    params = [torch.as_tensor(v) for v in (angle, zoom, flip_h, flip_w)]
    sizes = {p.numel() for p in params if p.dim() > 0}
    if batch is None:
        batch = max(sizes) if sizes else 1
    if sizes - {batch}:
        raise ValueError(f"spatial parameters of {sorted(sizes)} samples for a batch of {batch}")
    angle_t, zoom_t = (p.to(torch.float64).reshape(-1).expand(batch).clone() for p in params[:2])
    fh, fw = (p.to(torch.bool).reshape(-1).expand(batch).clone() for p in params[2:])
    if bool((zoom_t <= 0).any()):
        raise ValueError(f"zoom must be positive, got {zoom_t.tolist()}")
    # output -> input in centred pixels: the inverse of zoom * R(angle) * F, i.e. F * R(-angle) / zoom
    rad = torch.deg2rad(angle_t)
    cos, sin = torch.cos(rad), torch.sin(rad)
    sx = 1.0 - 2.0 * fw.to(torch.float64)  # F = diag(sx, sy) in (u, v)
    sy = 1.0 - 2.0 * fh.to(torch.float64)
    m = torch.zeros(batch, 2, 3, dtype=torch.float64)
    m[:, 0, 0] = sx * cos / zoom_t
    m[:, 0, 1] = sx * sin / zoom_t
    m[:, 1, 0] = -sy * sin / zoom_t
    m[:, 1, 1] = sy * cos / zoom_t
    # exact zeros and ones at multiples of 90 degrees (cos(pi / 2) is 6e-17, not 0)
    m = torch.where(m.abs() < 1e-12, torch.zeros_like(m), m)
    return SpatialDraw(matrices=m.float(), angle=angle_t, zoom=zoom_t, flip_h=fh, flip_w=fw)


def identity_draw(batch: int) -> SpatialDraw:
    """``batch`` samples left as they are."""
    return make_spatial_draw(0.0, 1.0, False, False, batch=batch)


def draw_spatial_changes(cfg: AugmentConfig, batch: int, generator: torch.Generator) -> SpatialDraw:
    """Draw ``batch`` independent spatial changes (on the CPU, from ``generator``).

    A sample is rotated and zoomed with probability ``cfg.prob``: by an angle uniform in
    ``[-cfg.rotate_deg, cfg.rotate_deg]`` degrees and a zoom uniform in
    ``[1 - cfg.scale, 1 + cfg.scale]``; otherwise neither. When ``cfg.flip``, each sample is
    also flipped along H with probability 0.5 and along W with probability 0.5, independently
    of each other and of ``cfg.prob`` (the four flip states are equally likely). Every
    random number is drawn whatever the configuration, so a seed gives the same sequence of
    draws under any options. ``flip: false, rotate_deg: 0, scale: 0`` gives identities.
    """
    on = torch.rand(batch, generator=generator) < cfg.prob
    u_angle = torch.rand(batch, generator=generator, dtype=torch.float64)
    u_zoom = torch.rand(batch, generator=generator, dtype=torch.float64)
    flip_h = (torch.rand(batch, generator=generator) < 0.5) & cfg.flip
    flip_w = (torch.rand(batch, generator=generator) < 0.5) & cfg.flip
    angle = torch.where(on, cfg.rotate_deg * (2.0 * u_angle - 1.0), 0.0)
    zoom = torch.where(on, 1.0 + cfg.scale * (2.0 * u_zoom - 1.0), 1.0)
    return make_spatial_draw(angle, zoom, flip_h, flip_w, batch=batch)


def slice_thetas(matrices: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Square-slice thetas ``(B, 2, 3)`` -> the thetas of an ``H x W`` slice (float64).

    Normalised coordinates are ``2 u / W`` along W and ``2 v / H`` along H, so a matrix acting
    on centred pixels is conjugated by ``diag(2 / W, 2 / H)``: the ``(0, 1)`` entry scales by
    ``H / W`` and the ``(1, 0)`` entry by ``W / H``. Translations stay in normalised units.
    """
    theta = matrices.to(torch.float64).clone()
    if h != w:
        theta[:, 0, 1] *= h / w
        theta[:, 1, 0] *= w / h
    return theta


def _invert(theta: torch.Tensor) -> torch.Tensor:
    """The inverse affine maps ``(B, 2, 3)``: ``[M | t] -> [M^-1 | -M^-1 t]``."""
    inv = torch.linalg.inv(theta[:, :, :2])
    return torch.cat([inv, -(inv @ theta[:, :, 2:])], dim=2)


def _is_identity(matrices: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: the sample's matrix is exactly the identity."""
    eye = torch.eye(2, 3, dtype=matrices.dtype, device=matrices.device)
    return (matrices == eye).flatten(1).all(dim=1)


def _sample(x: torch.Tensor, theta: torch.Tensor, identity: torch.Tensor, mode: str) -> torch.Tensor:
    """Resample ``x`` ``(B, C, H, W)`` float by ``theta`` ``(B, 2, 3)``; samples marked
    ``identity`` ``(B,)`` are copied exactly (bilinear sampling at the pixel centres is the
    identity only up to rounding)."""
    if x.shape[0] != theta.shape[0]:
        raise ValueError(f"a draw of {theta.shape[0]} samples for a batch of {x.shape[0]}")
    if x.shape[0] == 0:
        return x.clone()
    grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
    keep = identity.to(x.device).view(-1, 1, 1, 1)
    return torch.where(keep, x, out)


def _check_images(x: torch.Tensor) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"expected (B, C, H, W) float images, got {tuple(x.shape)} {x.dtype}")


def warp_images(x: torch.Tensor, draw: SpatialDraw) -> torch.Tensor:
    """Apply ``draw`` to images ``(B, C, H, W)`` float -> ``(B, C, H, W)``, same dtype and device.

    Bilinear, zero outside the image; all ``C`` channels of a sample share its transform.
    """
    _check_images(x)
    theta = slice_thetas(draw.matrices, *x.shape[-2:])
    return _sample(x, theta, _is_identity(draw.matrices), "bilinear")


def warp_labels(y: torch.Tensor, draw: SpatialDraw) -> torch.Tensor:
    """Apply ``draw`` to integer label maps ``(B, H, W)`` or ``(B, G, H, W)`` -> same shape and dtype.

    Nearest neighbour on the label values; label 0 outside the image. A pixel lands exactly
    where it lands in :func:`warp_images`.
    """
    if y.dim() not in (3, 4):
        raise ValueError(f"expected (B, H, W) or (B, G, H, W) label maps, got {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex():
        raise ValueError(f"expected integer label maps, got {y.dtype}")
    flat = y.unsqueeze(1) if y.dim() == 3 else y
    theta = slice_thetas(draw.matrices, *y.shape[-2:])
    # label values up to 2**24 are exact in float32
    out = _sample(flat.to(torch.float32), theta, _is_identity(draw.matrices), "nearest")
    out = out.round_().to(y.dtype)
    return out.squeeze(1) if y.dim() == 3 else out


def warp_back(x: torch.Tensor, draw: SpatialDraw) -> torch.Tensor:
    """Apply the inverse of ``draw`` to maps ``(B, C, H, W)`` float (e.g. class probabilities
    predicted on warped images) -> ``(B, C, H, W)``, bilinear, zero outside.

    ``warp_back(warp_images(x, d), d)`` is ``x`` up to two bilinear interpolations wherever
    the warped image still covers it (zoom above 1 or a rotation pushes the borders out).
    """
    _check_images(x)
    theta = _invert(slice_thetas(draw.matrices, *x.shape[-2:]))
    return _sample(x, theta, _is_identity(draw.matrices), "bilinear")


class BatchSpatialAugment:
    """Random flips, rotations and zooms, one independent draw per sample of a batch.

    Args:
        cfg: augmentation options (``flip``, ``rotate_deg``, ``scale``, ``prob``); with no
            flip, no rotation and no zoom this is the identity.
        seed: seed of the random draws.
    """

    def __init__(self, cfg: AugmentConfig, seed: int = 0) -> None:
        self.cfg = cfg
        self.enabled = bool(cfg.flip or cfg.rotate_deg > 0 or cfg.scale > 0)
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, batch: int) -> SpatialDraw:
        """The next ``batch`` draws (identities when not enabled, without using the generator)."""
        if not self.enabled:
            return identity_draw(batch)
        return draw_spatial_changes(self.cfg, batch, self.generator)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, SpatialDraw]:
        """Images ``(B, C, H, W)`` float and label maps ``(B, H, W)`` or ``(B, G, H, W)`` ->
        the warped images, the warped labels (same shapes, dtypes and device) and the draw.

        When not enabled the inputs themselves come back, with an identity draw.
        """
        draw = self.draw(images.shape[0])
        if not self.enabled:
            return images, labels, draw
        return warp_images(images, draw), warp_labels(labels, draw), draw
