"""Vendor-style intensity augmentation built from MONAI's random intensity transforms.

Scanner vendors differ in contrast curve, bias field, noise, blur and intensity
histogram; these transforms draw such changes at random so that the segmenter
and the retriever learn anatomy rather than scanner appearance.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandBiasField,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandHistogramShift,
    RandomizableTransform,
    RandScaleIntensity,
    RandShiftIntensity,
    ScaleIntensityRange,
)
from monai.utils import convert_data_type, convert_to_dst_type, convert_to_tensor

from jras_core.config import AugmentConfig


class RandNonMonotoneIntensity(RandomizableTransform):
    """Map intensities through a random piecewise-linear, possibly non-monotone curve.

    Tissue contrast order can change between vendors (e.g. myocardium brighter
    than blood on one scanner, darker on another); a monotone transform can
    never produce that.

    Args:
        prob: probability of applying the transform.
        num_points: number of interior control points of the curve.
    """

    def __init__(self, prob: float = 0.1, num_points: int = 4) -> None:
        super().__init__(prob)
        self.num_points = num_points
        self._values = np.linspace(0.0, 1.0, num_points + 2)

    def randomize(self, data=None) -> None:
        super().randomize(None)
        if self._do_transform:
            self._values = self.R.uniform(0.0, 1.0, self.num_points + 2)

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        x = torch.as_tensor(img)
        knots = torch.linspace(0.0, 1.0, self.num_points + 2, dtype=x.dtype)
        values = torch.as_tensor(self._values, dtype=x.dtype)
        xc = x.clamp(0.0, 1.0)
        pos = torch.bucketize(xc, knots[1:-1])
        x0, x1 = knots[pos], knots[pos + 1]
        y0, y1 = values[pos], values[pos + 1]
        return y0 + (xc - x0) / (x1 - x0) * (y1 - y0)


class RandSharedBiasField(RandBiasField):
    """MONAI's :class:`~monai.transforms.RandBiasField` with its field computed once per call.

    The parent draws one set of coefficients per call and gives every channel the same
    field, but evaluates the polynomial once per channel; this evaluates it once and
    broadcasts it over the channels (the same values, a fraction of the work when a query
    is stacked with its guides).
    """

    def __call__(self, img, randomize: bool = True):
        img = convert_to_tensor(img, track_meta=get_track_meta())
        if randomize:
            self.randomize(img_size=img.shape[1:])
        if not self._do_transform:
            return img
        field = self._generate_random_field(spatial_shape=img.shape[1:], degree=self.degree, coeff=self._coeff)
        img_np, *_ = convert_data_type(img, np.ndarray)
        out, *_ = convert_to_dst_type(src=img_np * np.exp(field)[None], dst=img, dtype=self.dtype or img.dtype)
        return out


def intensity_transform(cfg: AugmentConfig) -> Compose:
    """The per-image random intensity pipeline for ``(1, H, W)`` images in ``[0, 1]``."""
    p = cfg.prob
    transforms = [
        RandSharedBiasField(degree=3, coeff_range=(0.0, cfg.bias_field), prob=p),
        RandAdjustContrast(prob=p, gamma=cfg.gamma),
        RandHistogramShift(num_control_points=(5, 10), prob=p * 0.5),
        RandScaleIntensity(factors=cfg.contrast_shift, prob=p),
        RandShiftIntensity(offsets=cfg.contrast_shift, prob=p),
        RandGaussianSmooth(sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0), prob=p * 0.5),
        RandGaussianNoise(prob=p, std=cfg.noise_std),
    ]
    if cfg.non_monotone > 0:
        transforms.insert(0, RandNonMonotoneIntensity(prob=cfg.non_monotone))
    transforms.append(ScaleIntensityRange(a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=False))
    return Compose(transforms)


class BatchIntensityAugment:
    """Apply :func:`intensity_transform` independently to each image of a batch.

    Args:
        cfg: augmentation options.
        seed: seed of the transforms' random state.
    """

    def __init__(self, cfg: AugmentConfig, seed: int = 0) -> None:
        self.enabled = cfg.intensity
        self.transform = intensity_transform(cfg)
        self.transform.set_random_state(seed=seed)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)`` float32, each image re-scaled to about ``[0, 1]``.

        The ``C`` channels of a sample receive one random change together (one contrast
        curve, bias field, intensity shift; independent noise), then each channel is
        re-scaled on its own: a query stacked with its guides stays alike in appearance.
        """
        if not self.enabled:
            return images
        return torch.stack(self.each(images)).contiguous()

    def each(self, images) -> list[torch.Tensor]:
        """:meth:`__call__` for samples of different channel counts: a sequence of
        ``(C_i, H, W)`` tensors -> a list of ``(C_i, H, W)`` float32 tensors."""
        if not self.enabled:
            return [torch.as_tensor(img, dtype=torch.float32) for img in images]
        tracking = get_track_meta()
        set_track_meta(False)  # plain tensors: same values, none of the metadata bookkeeping
        try:
            out = [convert_to_tensor(self.transform(img), dtype=torch.float32, track_meta=False) for img in images]
        finally:
            set_track_meta(tracking)
        rescaled = []
        for y in out:
            lo = y.amin(dim=(1, 2), keepdim=True)
            hi = y.amax(dim=(1, 2), keepdim=True)
            rescaled.append((y - lo) / (hi - lo).clamp_min(1e-6))
        return rescaled
