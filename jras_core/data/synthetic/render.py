"""Rendering of one synthetic case-phase: anatomy plus vendor appearance to an
image and its label mask.

Vectorised numpy over all slices of a volume: approximate signed distance
fields on a millimetre grid, partial-volume compositing, then the vendor's
contrast curve, bias field, ghost, k-space filtering and noise (FFT).
"""

from __future__ import annotations

import math

import numpy as np

from jras_core.data.synthetic.anatomy import _Anatomy, _slice_positions
from jras_core.data.synthetic.vendors import VendorSpec

# --------------------------------------------------------------------------- geometry


def _ellipse_sd(
    x: np.ndarray,
    y: np.ndarray,
    cx: np.ndarray | float,
    cy: np.ndarray | float,
    a: np.ndarray | float,
    b: np.ndarray | float,
    rot: np.ndarray | float = 0.0,
    wobble: np.ndarray | None = None,
) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to a rotated ellipse.

    ``x``, ``y`` are ``(1, H, W)`` grids in mm; the parameters broadcast as
    ``(Z, 1, 1)`` arrays or scalars. ``wobble`` ``(K, 2)`` (amplitude, phase)
    perturbs the radius by harmonics ``2..K+1`` of the polar angle. Absent
    ellipses (a semi-axis <= 0) give a large positive distance.

    Returns:
        ``(Z, H, W)`` float32.
    """
    f32 = np.float32
    a = np.asarray(a, dtype=f32)
    b = np.asarray(b, dtype=f32)
    present = (a > 0.05) & (b > 0.05)
    a = np.maximum(a, f32(0.05))
    b = np.maximum(b, f32(0.05))
    dx = x - np.asarray(cx, dtype=f32)
    dy = y - np.asarray(cy, dtype=f32)
    if wobble is None and np.array_equal(a, b):
        sd = np.sqrt(dx * dx + dy * dy) - a  # circle: exact
        return np.where(present, sd, f32(1e4))
    rot = np.asarray(rot, dtype=f32)
    cos, sin = np.cos(rot), np.sin(rot)
    u = dx * cos + dy * sin
    v = dy * cos - dx * sin
    ua, vb = u / a, v / b
    rho = np.sqrt(ua * ua + vb * vb) + f32(1e-6)
    if wobble is not None and len(wobble):
        theta = np.arctan2(v, u)
        mod = np.ones_like(rho)
        for k, (amp, phase) in enumerate(wobble, start=2):
            mod += f32(amp) * np.cos(k * theta + f32(phase))
        rho = rho / mod
    grad = np.sqrt((ua / a) ** 2 + (vb / b) ** 2) / rho + f32(1e-6)
    sd = (rho - f32(1.0)) / grad
    return np.where(present, sd, f32(1e4))


def _coverage(sd: np.ndarray, px: float) -> np.ndarray:
    """Partial-volume fraction of a pixel of side ``px`` mm at signed distance ``sd``."""
    return np.clip(0.5 - sd / px, 0.0, 1.0)


def _paint(img: np.ndarray, alpha: np.ndarray, value: np.ndarray | float) -> None:
    """Composite ``value`` over ``img`` in place with coverage ``alpha``."""
    img += alpha * (value - img)


def _gaussian_lowpass(shape: tuple[int, int], px: float, sigma_mm: float) -> np.ndarray:
    """Gaussian transfer function ``(H, W)`` for a blur of ``sigma_mm`` at pixel size ``px``."""
    fy = np.fft.fftfreq(shape[0], d=px)[:, None]
    fx = np.fft.fftfreq(shape[1], d=px)[None, :]
    return np.exp(-2.0 * (np.pi * sigma_mm) ** 2 * (fx * fx + fy * fy))


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int, int], px: float, sigma_mm: float
) -> np.ndarray:
    """Smooth random field ``(Z, H, W)`` float32 with unit standard deviation per slice."""
    white = rng.standard_normal(shape).astype(np.float32)
    spec = np.fft.rfft2(white) * _gaussian_lowpass(shape[1:], px, sigma_mm)[:, : shape[2] // 2 + 1]
    field_ = np.fft.irfft2(spec, s=shape[1:]).astype(np.float32)
    field_ -= field_.mean(axis=(1, 2), keepdims=True)
    field_ /= field_.std(axis=(1, 2), keepdims=True) + 1e-6
    return field_


# --------------------------------------------------------------------------- rendering


def _render(
    anat: _Anatomy,
    spec: VendorSpec,
    phase: str,
    size: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one case-phase.

    Returns:
        image ``(H, W, Z)`` float32 and mask ``(H, W, Z)`` int64.
    """
    px = spec.fov_mm / size
    pos = _slice_positions(anat, spec.slice_spacing_mm)
    nz = pos.size
    coords = (np.arange(size, dtype=np.float32) - (size - 1) / 2.0) * np.float32(px)
    y = coords[None, :, None]  # rows: anterior (top) -> posterior
    x = coords[None, None, :]  # columns: image left (patient right) -> image right

    def col(values: np.ndarray | float) -> np.ndarray:
        return np.broadcast_to(np.asarray(values, dtype=np.float32), (nz,)).reshape(nz, 1, 1)

    es = phase == "ES"
    # Long-axis geometry: the apex is fixed, the base descends at ES.
    length = anat.length * (1.0 - anat.es_short) if es else anat.length
    base = anat.length - length
    z = (pos - base) / length  # 0 base, 1 apex
    heart = (z >= -0.02) & (z < 1.0)
    atrial = z < -0.02
    zc = np.clip(z, 0.0, 1.0)

    r_endo0 = anat.r_endo * (anat.es_endo if es else 1.0)
    wall0 = anat.wall * (anat.es_wall if es else 1.0)
    r_epi0 = r_endo0 + wall0
    r_epi = np.where(heart, r_epi0 * np.sqrt(np.clip(1.0 - zc**2.2, 0.0, None)), 0.0)
    wall_z = wall0 * (1.0 - 0.2 * zc)
    r_endo = np.clip(r_epi - wall_z, 0.0, None)
    r_endo = np.where(r_endo > 1.0, r_endo, 0.0)

    shift = (1.0 if es else 0.0) * rng.normal(0.0, 1.0, 2)
    cx = anat.heart_c[0] + anat.heart_drift[0] * zc + shift[0]
    cy = anat.heart_c[1] + anat.heart_drift[1] * zc + shift[1]
    rot = anat.rot + (0.05 if es else 0.0)
    e = anat.ellip

    # RV: an ellipse beside the LV, minus the LV epicardium -> a crescent.
    s_rv = np.sqrt(np.clip(1.0 - (zc / anat.rv_extent) ** 2, 0.0, None)) * heart
    rv_size = (anat.r_endo + anat.wall) * (anat.es_rv if es else 1.0)
    rv_r = anat.rv_radial * rv_size * s_rv
    rv_t = anat.rv_tangent * rv_size * s_rv**0.6
    rv_ang = anat.rv_angle + rot
    rv_d = anat.rv_dist * r_epi + 0.2 * r_epi0 * (1.0 - s_rv)
    rvx = cx + rv_d * np.cos(rv_ang)
    rvy = cy + rv_d * np.sin(rv_ang)

    # ---------------- background anatomy
    img = np.zeros((nz, size, size), dtype=np.float32)
    bx, by = anat.body_c
    ax_, ay_ = anat.body_ax
    sd_body = _ellipse_sd(x, y, bx, by, ax_, ay_, anat.body_rot, anat.body_wobble)
    _paint(img, _coverage(sd_body, px), spec.fat)
    _paint(img, _coverage(sd_body + anat.fat_t, px), spec.tissue)
    inner = anat.fat_t + anat.muscle_t
    _paint(img, _coverage(sd_body + inner, px), 0.8 * spec.tissue + 0.2 * spec.fat)

    # Lungs shrink toward the diaphragm (apical slices); vessels inside.
    lung_s = col(1.0 - 0.35 * zc)
    lungs = [
        (bx - 0.50 * ax_, by - 0.2 * ay_, 0.30 * ax_ * anat.lung_scale[0], 0.52 * ay_, 0.35),
        (bx + 0.50 * ax_, by - 0.15 * ay_, 0.28 * ax_ * anat.lung_scale[1], 0.50 * ay_, -0.35),
    ]
    lung_alpha = []
    for (lx, ly, la, lb, lr), wob in zip(lungs, anat.lung_wobble):
        a = _coverage(_ellipse_sd(x, y, lx, ly, la * lung_s, lb * lung_s, lr, wob), px)
        _paint(img, a, spec.lung)
        lung_alpha.append(a)
    sd_vessels = np.full((1, size, size), 1e4, dtype=np.float32)
    for li, frac, ang, rad in anat.vessels:
        lx, ly, la, lb, _ = lungs[int(li)]
        vx = lx + frac * la * 0.7 * math.cos(ang)
        vy = ly + frac * lb * 0.7 * math.sin(ang)
        np.minimum(sd_vessels, _ellipse_sd(x, y, vx, vy, rad, rad), out=sd_vessels)
    _paint(img, _coverage(sd_vessels, px) * np.maximum(*lung_alpha), 0.7 * spec.blood)

    # Liver rises into view toward the apex; stomach on the other side.
    liver_y = by + 0.62 * ay_ - 45.0 * zc + anat.liver_shift
    sd_liver = _ellipse_sd(x, y, bx - 0.28 * ax_, col(liver_y), 0.55 * ax_, 0.42 * ay_, 0.25)
    _paint(img, _coverage(sd_liver + anat.fat_t + 2.0, px), spec.liver)
    st_s = col(np.clip(zc * 1.6 - 0.3, 0.0, 1.0))
    stomach_val = anat.stomach_w * 0.9 * spec.blood + (1.0 - anat.stomach_w) * spec.tissue
    sd_st = _ellipse_sd(
        x,
        y,
        bx + 0.42 * ax_,
        by + 0.25 * ay_,
        anat.stomach_ax[0] * st_s,
        anat.stomach_ax[1] * st_s,
        0.3,
    )
    _paint(img, _coverage(sd_st, px), stomach_val)

    # Spine (vertebral body with a dark cortical rim) and descending aorta.
    sx_, sy_ = bx, by + 0.72 * ay_
    sd_spine = _ellipse_sd(x, y, sx_, sy_, 17.0, 15.0)
    _paint(img, _coverage(sd_spine, px), 0.5 * spec.lung + 0.1 * spec.tissue)
    _paint(img, _coverage(sd_spine + 2.0, px), 0.8 * spec.tissue + 0.2 * spec.fat)
    _paint(
        img,
        _coverage(_ellipse_sd(x, y, sx_ + 22.0, sy_ - 24.0, anat.aorta_r, anat.aorta_r), px),
        spec.blood,
    )

    # Atria and aortic root on slices above the base (blood pools, unlabelled).
    at = col(atrial.astype(np.float32))
    if atrial.any():
        _paint(
            img,
            _coverage(_ellipse_sd(x, y, col(cx + 12.0), col(cy + 18.0), 22.0 * at, 17.0 * at), px),
            spec.blood,
        )
        _paint(
            img,
            _coverage(_ellipse_sd(x, y, col(cx - 30.0), col(cy + 2.0), 18.0 * at, 22.0 * at), px),
            spec.rv_blood,
        )
        sd_ao = _ellipse_sd(x, y, col(cx - 4.0), col(cy - 8.0), 13.0 * at, 13.0 * at)
        _paint(img, _coverage(sd_ao - 2.0, px), spec.myocardium)
        _paint(img, _coverage(sd_ao, px), spec.blood)

    # ---------------- heart
    sd_epi = _ellipse_sd(x, y, col(cx), col(cy), col(r_epi * (1 + e)), col(r_epi * (1 - e)), rot)
    sd_endo = _ellipse_sd(
        x, y, col(cx), col(cy), col(r_endo * (1 + e)), col(r_endo * (1 - e)), rot, anat.endo_wobble
    )
    sd_rv = _ellipse_sd(x, y, col(rvx), col(rvy), col(rv_r), col(rv_t), col(rv_ang), anat.rv_wobble)

    # Epicardial fat along part of the heart's outline.
    theta = np.arctan2(y - col(cy), x - col(cx))
    fat_t = anat.epi_fat_t * (0.5 + 0.5 * np.cos(theta - anat.epi_fat_angle)) ** 2
    sd_heart = np.minimum(sd_epi, sd_rv - anat.rv_wall)
    _paint(img, _coverage(sd_heart - fat_t, px), spec.fat)
    _paint(img, _coverage(sd_rv - anat.rv_wall, px), spec.myocardium)
    _paint(img, _coverage(sd_rv, px), spec.rv_blood)
    _paint(img, _coverage(sd_epi, px), spec.myocardium)
    _paint(img, _coverage(sd_endo, px), spec.blood)

    # Papillary muscles inside the LV cavity (labelled LV, as in M&Ms).
    pap = np.sin(np.pi * np.clip((zc - 0.15) / 0.7, 0.0, 1.0)) * heart
    pap_r = r_endo * (0.28 if es else 0.17) * pap
    for ang in anat.pap_angles:
        a_ = anat.rv_angle + np.pi + ang + rot
        px_c = cx + 0.62 * r_endo * np.cos(a_)
        py_c = cy + 0.62 * r_endo * np.sin(a_)
        sd_p = _ellipse_sd(x, y, col(px_c), col(py_c), col(pap_r), col(pap_r * 0.8), a_)
        _paint(img, _coverage(sd_p, px) * _coverage(sd_endo, px), spec.myocardium)

    mask = np.zeros((nz, size, size), dtype=np.int64)
    mask[(sd_rv < 0) & (sd_epi >= 0)] = 3
    mask[sd_epi < 0] = 2
    mask[sd_endo < 0] = 1

    # ---------------- appearance
    shape = img.shape
    img *= 1.0 + spec.texture * _smooth_noise(rng, shape, px, 5.0)
    img = np.clip(img, 0.0, None) ** np.float32(spec.gamma)

    # Coil bias: smooth log-intensity field, mostly a gradient in a random direction.
    half = spec.fov_mm / 2.0
    g = rng.normal(0.0, 1.0, 3)
    bias = (g[0] * x + g[1] * y) / half + 0.5 * g[2] * ((x * x + y * y) / half**2 - 0.5)
    bias = bias / (np.linalg.norm(g) + 1e-6) + 0.3 * _smooth_noise(rng, (1, size, size), px, 40.0)
    img *= np.exp(np.float32(spec.bias_strength) * bias).astype(np.float32)

    if spec.ghost > 0:
        img += np.float32(spec.ghost) * np.roll(img, size // 2, axis=1)

    # Acquisition: k-space truncation to the acquired resolution, reconstruction blur,
    # complex noise added in k-space (so band-limited like the signal), magnitude.
    fy = np.fft.fftfreq(size, d=px)[:, None]
    fx = np.fft.fftfreq(size, d=px)[None, :]
    kmax = 0.5 / spec.resolution_mm
    transfer = ((np.abs(fx) <= kmax) & (np.abs(fy) <= kmax)).astype(np.float32)
    if spec.blur_mm > 0:
        transfer = transfer * _gaussian_lowpass((size, size), px, spec.blur_mm).astype(np.float32)
    noise_gain = 1.0 / math.sqrt(float(np.mean(transfer**2)) + 1e-12)
    kspace = np.fft.fft2(img)
    sigma = spec.noise_std * noise_gain * size  # per-pixel image-domain std = noise_std
    noise = rng.standard_normal((2, *shape)).astype(np.float32)
    kspace = (kspace + sigma * (noise[0] + 1j * noise[1])) * transfer
    recon = np.fft.ifft2(kspace)
    if spec.rician:
        out = np.abs(recon)
    else:
        out = recon.real
    scale = spec.scale * rng.uniform(0.85, 1.2)
    out = (out * scale).astype(np.float32)

    return np.ascontiguousarray(np.moveaxis(out, 0, -1)), np.ascontiguousarray(
        np.moveaxis(mask, 0, -1)
    )
