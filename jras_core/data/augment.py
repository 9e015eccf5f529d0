"""Vendor-style intensity augmentation, drawn per sample and applied to a whole batch at once.

Scanner vendors differ in contrast curve, bias field, noise, blur and intensity
histogram; these changes are drawn at random so that the segmenter and the retriever
learn anatomy rather than scanner appearance.

Each change is the one a MONAI random intensity transform makes (``RandBiasField``,
``RandAdjustContrast``, ``RandHistogramShift``, ``RandScaleIntensity``,
``RandShiftIntensity``, ``RandGaussianSmooth``, ``RandGaussianNoise``, in that order),
with its parameters drawn from the same ranges and probabilities. Those transforms take
one image and one draw per call; here every sample of a ``(B, C, H, W)`` batch gets its
own draw and the batch is changed in a few tensor operations (the tests check each
change against the MONAI transform given the same parameters). The ``C`` channels of a
sample are one image: they share the draw, as a query stacked with its guides should.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from jras_core.config import AugmentConfig

BIAS_DEGREE = 3
"""Degree of the bias field's Legendre polynomial (MONAI's default)."""
HISTOGRAM_POINTS = (5, 10)
"""Range of the number of control points of the histogram shift."""
SMOOTH_SIGMA = (0.25, 1.0)
"""Range of the Gaussian blur's sigma, in pixels, along each axis."""
SMOOTH_TRUNCATED = 4.0
"""The blur kernel reaches ``int(max(4 sigma, 0.5) + 0.5)`` pixels each side (MONAI's ``gaussian_1d``)."""
NON_MONOTONE_POINTS = 4
"""Interior control points of the non-monotone intensity curve."""


@dataclass
class IntensityDraw:
    """The random parameters of one batch of ``B`` intensity changes.

    Each ``*_on`` is a ``(B,)`` bool: whether that sample receives the change.
    """

    curve_on: torch.Tensor
    curve_values: torch.Tensor
    """``(B, NON_MONOTONE_POINTS + 2)`` curve values at equally spaced knots on ``[0, 1]``."""
    bias_on: torch.Tensor
    bias_coeff: torch.Tensor
    """``(B, 10)`` Legendre coefficients, in the order of ``numpy.tril_indices(4)``."""
    gamma_on: torch.Tensor
    gamma: torch.Tensor
    """``(B,)``"""
    histogram_on: torch.Tensor
    histogram_points: torch.Tensor
    """``(B,)`` number of control points ``n`` of each sample."""
    histogram_floating: torch.Tensor
    """``(B, max n)`` where the reference points ``linspace(0, 1, n)`` move to (padded with 1)."""
    scale_on: torch.Tensor
    scale: torch.Tensor
    """``(B,)`` relative change: ``x * (1 + scale)``."""
    shift_on: torch.Tensor
    shift: torch.Tensor
    """``(B,)`` offset: ``x + shift``."""
    smooth_on: torch.Tensor
    sigma: torch.Tensor
    """``(B, 2)`` blur sigma along H and W."""
    noise_on: torch.Tensor
    noise_std: torch.Tensor
    """``(B,)`` standard deviation of the additive Gaussian noise."""


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)


def draw_intensity_changes(cfg: AugmentConfig, batch: int, generator: torch.Generator) -> IntensityDraw:
    """Draw the parameters of ``batch`` independent intensity changes (ranges and
    probabilities of ``cfg``; float64 parameters, as MONAI draws them)."""
    p = cfg.prob

    def on(prob: float) -> torch.Tensor:
        return torch.rand(batch, generator=generator) < prob

    lo_pts, hi_pts = HISTOGRAM_POINTS
    points = torch.randint(lo_pts, hi_pts + 1, (batch,), generator=generator)
    # MONAI's draw: interior points one after another, each uniform between its left
    # neighbour (already moved) and its right one (not yet moved)
    slots = torch.arange(hi_pts, dtype=torch.float64)
    floating = (slots / (points - 1).unsqueeze(1)).clamp(max=1.0)
    for i in range(1, hi_pts - 1):
        u = torch.rand(batch, generator=generator, dtype=torch.float64)
        moved = floating[:, i - 1] + (floating[:, i + 1] - floating[:, i - 1]) * u
        floating[:, i] = torch.where(i < points - 1, moved, floating[:, i])
    n_coeff = (BIAS_DEGREE + 1) * (BIAS_DEGREE + 2) // 2
    return IntensityDraw(
        curve_on=on(cfg.non_monotone),
        curve_values=torch.rand(batch, NON_MONOTONE_POINTS + 2, generator=generator, dtype=torch.float64),
        bias_on=on(p),
        bias_coeff=cfg.bias_field * torch.rand(batch, n_coeff, generator=generator, dtype=torch.float64),
        gamma_on=on(p),
        gamma=_uniform(batch, *cfg.gamma, generator),
        histogram_on=on(p * 0.5),
        histogram_points=points,
        histogram_floating=floating,
        scale_on=on(p),
        scale=_uniform(batch, -cfg.contrast_shift, cfg.contrast_shift, generator),
        shift_on=on(p),
        shift=_uniform(batch, -cfg.contrast_shift, cfg.contrast_shift, generator),
        smooth_on=on(p * 0.5),
        sigma=torch.stack([_uniform(batch, *SMOOTH_SIGMA, generator) for _ in range(2)], dim=1),
        noise_on=on(p),
        noise_std=_uniform(batch, 0.0, cfg.noise_std, generator),
    )


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` -> ``(B, 1, 1, 1)`` in ``like``'s dtype, on its device."""
    return v.to(device=like.device, dtype=like.dtype).view(-1, 1, 1, 1)


def _image_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample minimum and maximum over all channels, each ``(B, 1, 1, 1)``."""
    flat = x.flatten(1)
    return flat.amin(1).view(-1, 1, 1, 1), flat.amax(1).view(-1, 1, 1, 1)


def non_monotone_curve(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Map ``x`` ``(B, C, H, W)`` (clamped to ``[0, 1]``) through per-sample piecewise-linear
    curves with ``values`` ``(B, P)`` at ``P`` equally spaced knots: tissue contrast order can
    change, as between vendors, which no monotone transform produces."""
    b, n = values.shape
    knots = torch.linspace(0.0, 1.0, n, dtype=x.dtype, device=x.device)
    xc = x.clamp(0.0, 1.0).reshape(b, -1)
    pos = torch.bucketize(xc, knots[1:-1])
    vals = values.to(device=x.device, dtype=x.dtype)
    y0, y1 = vals.gather(1, pos), vals.gather(1, pos + 1)
    x0 = knots[pos]
    return (y0 + (xc - x0) * (n - 1) * (y1 - y0)).view_as(x)


@lru_cache(maxsize=8)
def _legendre_basis(h: int, w: int, degree: int = BIAS_DEGREE) -> torch.Tensor:
    """``(n_coeff, H, W)`` products ``L_i(y) L_j(x)`` over ``[-1, 1]^2`` for the lower-triangular
    ``(i, j)`` of ``numpy.tril_indices(degree + 1)`` (MONAI's ``RandBiasField`` layout)."""
    ly = np.polynomial.legendre.legvander(np.linspace(-1.0, 1.0, h, dtype=np.float32).astype(np.float64), degree)
    lx = np.polynomial.legendre.legvander(np.linspace(-1.0, 1.0, w, dtype=np.float32).astype(np.float64), degree)
    rows, cols = np.tril_indices(degree + 1)
    basis = ly[:, rows].T[:, :, None] * lx[:, cols].T[:, None, :]
    return torch.from_numpy(basis)


def bias_field(coeff: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Log bias fields ``(B, H, W)`` (float64) of Legendre coefficients ``(B, n_coeff)``."""
    return torch.einsum("bn,nhw->bhw", coeff.to(torch.float64), _legendre_basis(h, w))


def adjust_contrast(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Per-sample gamma curve over each sample's own intensity range (MONAI's ``AdjustContrast``)."""
    lo, hi = _image_range(x)
    span = hi - lo
    # u ** gamma as exp(gamma log u), in place on the one temporary
    u = ((x - lo) / (span + 1e-7)).log_().mul_(_col(gamma, x)).exp_()
    return u.mul_(span).add_(lo)


def histogram_shift(x: torch.Tensor, points: torch.Tensor, floating: torch.Tensor) -> torch.Tensor:
    """Per-sample piecewise-linear remap moving the control points ``linspace(0, 1, n)`` of each
    sample's intensity range to ``floating`` (MONAI's ``RandHistogramShift`` given its draw).
    A constant sample is returned unchanged."""
    b = x.shape[0]
    lo, hi = _image_range(x)
    span = (hi - lo).view(b, 1)
    last = (points - 1).view(b, 1).to(device=x.device, dtype=x.dtype)
    fp = floating.to(device=x.device, dtype=x.dtype)
    # position on the equally spaced reference points: segment and fraction within it
    t = (x.reshape(b, -1) - lo.view(b, 1)) / span.clamp_min(torch.finfo(x.dtype).tiny) * last
    seg = t.floor().clamp_(min=0).minimum(last - 1)
    frac = t - seg
    seg = seg.long()
    y = fp.gather(1, seg).addcmul_(frac, fp.diff(dim=1).gather(1, seg))
    out = y.mul_(span).add_(lo.view(b, 1)).view_as(x)
    return torch.where((span > 0).view(b, 1, 1, 1), out, x)


def gaussian_kernels(sigma: torch.Tensor, tail: int) -> torch.Tensor:
    """``(B, 2 tail + 1)`` erf-approximated Gaussian kernels (MONAI's ``gaussian_1d``, not
    normalised), each cut to its own sigma's reach and zero-padded to ``tail`` each side."""
    x = torch.arange(-tail, tail + 1, dtype=torch.float32)
    s = sigma.to(torch.float32).view(-1, 1)
    t = 0.70710678 / s.abs()
    kernel = (0.5 * ((t * (x + 0.5)).erf() - (t * (x - 0.5)).erf())).clamp(min=0)
    reach = ((s * SMOOTH_TRUNCATED).clamp_min(0.5) + 0.5).floor()
    return kernel * (x.abs() <= reach)


def gaussian_smooth(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable per-sample Gaussian blur with zero padding; ``sigma`` ``(B, 2)`` along H and W
    (MONAI's ``GaussianSmooth``). Two depthwise convolutions over all ``B x C`` channels, each
    channel with its sample's kernels."""
    tail = int(max(float(sigma.max()) * SMOOTH_TRUNCATED, 0.5) + 0.5)
    b, c, h, w = x.shape
    ky, kx = (gaussian_kernels(sigma[:, axis], tail).to(device=x.device, dtype=x.dtype).repeat_interleave(c, dim=0)
              for axis in (0, 1))
    y = torch.nn.functional.conv2d(x.reshape(1, b * c, h, w), ky.view(b * c, 1, -1, 1), padding=(tail, 0), groups=b * c)
    y = torch.nn.functional.conv2d(y, kx.view(b * c, 1, 1, -1), padding=(0, tail), groups=b * c)
    return y.view(b, c, h, w)


def apply_intensity_changes(x: torch.Tensor, draw: IntensityDraw, generator: torch.Generator) -> torch.Tensor:
    """Apply ``draw`` (on the CPU) to ``x`` ``(B, C, H, W)`` float32 on any device; ``generator``
    draws the noise (on its own device; the noise is moved to ``x``'s)."""
    h, w = x.shape[-2:]
    x = x.clone()

    def on_rows(mask: torch.Tensor, change) -> None:
        rows = mask.nonzero().squeeze(1)  # indexes the draw (CPU)
        if len(rows) == len(mask):  # every sample: no gathering
            x.copy_(change(x, rows))
        elif len(rows):
            at = rows.to(x.device)
            x[at] = change(x[at], rows)

    def neutral_off(values: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
        """Per-sample parameters, zero (no change) for the samples that do not receive it."""
        return values * on.view(-1, *([1] * (values.dim() - 1))).to(values.dtype)

    # changes that leave a sample as it is at a zero parameter run on the whole batch (exactly
    # the identity there: x * exp(0), x * (1 + 0), x + 0); the others only on their samples
    on_rows(draw.curve_on, lambda v, r: non_monotone_curve(v, draw.curve_values[r]))
    if bool(draw.bias_on.any()):
        field = bias_field(neutral_off(draw.bias_coeff, draw.bias_on), h, w).exp_()
        x.mul_(field.to(device=x.device, dtype=x.dtype).unsqueeze(1))
    on_rows(draw.gamma_on, lambda v, r: adjust_contrast(v, draw.gamma[r]))
    on_rows(draw.histogram_on, lambda v, r: histogram_shift(v, draw.histogram_points[r], draw.histogram_floating[r]))
    x.mul_(1.0 + _col(neutral_off(draw.scale, draw.scale_on), x))
    x.add_(_col(neutral_off(draw.shift, draw.shift_on), x))
    on_rows(draw.smooth_on, lambda v, r: gaussian_smooth(v, draw.sigma[r]))
    if bool(draw.noise_on.any()):
        noise = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
        x.add_(noise.mul_(_col(neutral_off(draw.noise_std, draw.noise_on), noise)))
    return x


class BatchIntensityAugment:
    """Random vendor-style intensity changes, one independent draw per sample of a batch.

    Args:
        cfg: augmentation options (``intensity: false`` makes this the identity).
        seed: seed of the random draws.
    """

    def __init__(self, cfg: AugmentConfig, seed: int = 0) -> None:
        self.cfg = cfg
        self.enabled = cfg.intensity
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self._noise: dict[torch.device, torch.Generator] = {}

    def noise_generator(self, device: torch.device) -> torch.Generator:
        """The generator of the noise for images on ``device``: the parameters' own CPU
        generator for CPU images (as before any device existed), one on the device otherwise,
        so that the noise never crosses from the CPU."""
        if device.type == "cpu":
            return self.generator
        if device not in self._noise:
            self._noise[device] = torch.Generator(device=device).manual_seed(self.seed + 1)
        return self._noise[device]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)`` float32, each channel re-scaled to ``[0, 1]``.

        The ``C`` channels of a sample receive one random change together (one contrast
        curve, bias field, intensity shift, blur; independent noise), then each channel is
        re-scaled on its own: a query stacked with its guides stays alike in appearance.
        """
        if not self.enabled:
            return images
        x = torch.as_tensor(images, dtype=torch.float32)
        if x.shape[0] == 0:
            return x.clone()
        draw = draw_intensity_changes(self.cfg, x.shape[0], self.generator)
        y = apply_intensity_changes(x, draw, self.noise_generator(x.device))  # a new tensor: re-scaled in place
        lo = y.amin(dim=(2, 3), keepdim=True)
        hi = y.amax(dim=(2, 3), keepdim=True)
        return y.sub_(lo).div_((hi - lo).clamp_min_(1e-6)).contiguous()
