"""Tests of jras_core.data.augment: batched intensity changes and their draws."""

import numpy as np
import torch

from jras_core.config import AugmentConfig
from jras_core.data.augment import BatchIntensityAugment


def test_augmentation_is_seeded_and_bounded():
    x = torch.rand(4, 1, 32, 32)
    a = BatchIntensityAugment(AugmentConfig(non_monotone=0.5), seed=3)(x)
    b = BatchIntensityAugment(AugmentConfig(non_monotone=0.5), seed=3)(x)
    c = BatchIntensityAugment(AugmentConfig(non_monotone=0.5), seed=4)(x)
    assert type(a) is torch.Tensor  # plain tensor, no MONAI metadata overhead downstream
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1 and a.shape == x.shape
    off = BatchIntensityAugment(AugmentConfig(intensity=False))(x)
    assert torch.equal(off, x)


def _draw(batch: int = 5, seed: int = 0, **cfg):
    from jras_core.data.augment import draw_intensity_changes

    return draw_intensity_changes(AugmentConfig(**cfg), batch, torch.Generator().manual_seed(seed))


def test_non_monotone_remap_can_reverse_tissue_order():
    from jras_core.data.augment import non_monotone_curve

    ramp = torch.linspace(0, 1, 101).expand(20, 1, 1, 101)
    y = non_monotone_curve(ramp, _draw(20, non_monotone=1.0).curve_values)
    assert y.shape == ramp.shape and (y >= 0).all() and (y <= 1).all()
    assert bool((y.diff(dim=-1) < 0).any())  # some curve reverses the order of intensities
    knots = torch.linspace(0, 1, 6).view(1, 1, 1, 6)  # at the knots the curve takes its values
    values = torch.rand(1, 6, dtype=torch.float64)
    torch.testing.assert_close(non_monotone_curve(knots, values).flatten(), values.float().flatten())


def test_draws_follow_the_configured_ranges_and_probabilities():
    d = _draw(4000, prob=0.8, gamma=(0.5, 2.0), contrast_shift=0.25, noise_std=0.08, bias_field=0.4)
    for on, p in ((d.gamma_on, 0.8), (d.noise_on, 0.8), (d.histogram_on, 0.4), (d.smooth_on, 0.4), (d.curve_on, 0.0)):
        assert abs(on.float().mean().item() - p) < 0.03
    assert 0.5 <= d.gamma.min() and d.gamma.max() <= 2.0 and d.gamma.std() > 0.3
    assert d.scale.abs().max() <= 0.25 and d.shift.abs().max() <= 0.25 and 0 <= d.noise_std.min()
    assert 0 <= d.bias_coeff.min() and d.bias_coeff.max() <= 0.4 and d.bias_coeff.shape == (4000, 10)
    assert 0.25 <= d.sigma.min() and d.sigma.max() <= 1.0
    assert set(d.histogram_points.tolist()) == set(range(5, 11))
    f = d.histogram_floating
    assert bool((f[:, 0] == 0).all()) and bool((f[:, -1] == 1).all()) and bool((f.diff(dim=1) >= 0).all())
    n = d.histogram_points
    last = f.gather(1, (n - 1).unsqueeze(1)).squeeze(1)
    assert bool((last == 1).all())  # each sample's own last control point stays at 1


def test_each_change_is_the_monai_transform_with_that_draw():
    from monai.transforms import AdjustContrast, GaussianSmooth, RandBiasField, RandHistogramShift

    from jras_core.data.augment import adjust_contrast, bias_field, gaussian_smooth, histogram_shift

    torch.manual_seed(0)
    x = torch.rand(5, 2, 20, 24) * 3 + 0.5
    x[3] = 1.25  # a constant sample: histogram shift leaves it alone, as MONAI's does
    d = _draw(5, seed=2)
    field = bias_field(d.bias_coeff, 20, 24)
    contrast = adjust_contrast(x, d.gamma)
    shifted = histogram_shift(x, d.histogram_points, d.histogram_floating)
    smooth = gaussian_smooth(x, d.sigma)
    reference_field = RandBiasField(degree=3)
    for b in range(5):
        expected = reference_field._generate_random_field((20, 24), 3, d.bias_coeff[b].tolist())
        torch.testing.assert_close(field[b], torch.from_numpy(expected), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(contrast[b], torch.as_tensor(AdjustContrast(float(d.gamma[b]))(x[b])))
        n = int(d.histogram_points[b])
        shift = RandHistogramShift(num_control_points=n, prob=1.0)
        shift._do_transform = True
        shift.reference_control_points = np.linspace(0, 1, n)
        shift.floating_control_points = d.histogram_floating[b, :n].numpy()
        with np.errstate(all="ignore"):
            expected = torch.as_tensor(shift(x[b], randomize=False))
        torch.testing.assert_close(shifted[b], expected, rtol=1e-5, atol=1e-5)
        sigma = tuple(float(s) for s in d.sigma[b].float())
        torch.testing.assert_close(smooth[b], torch.as_tensor(GaussianSmooth(sigma=sigma)(x[b])), rtol=1e-5, atol=1e-5)
    assert torch.equal(shifted[3], x[3]) and not torch.allclose(shifted[0], x[0])


def test_a_sample_is_changed_only_by_the_changes_its_draw_turns_on():
    from jras_core.data.augment import apply_intensity_changes

    torch.manual_seed(0)
    x = torch.rand(4, 2, 16, 16) + 0.5
    d = _draw(4, prob=0.8, seed=3)
    for name in ("curve_on", "bias_on", "gamma_on", "histogram_on", "scale_on", "shift_on", "smooth_on", "noise_on"):
        on = getattr(d, name)
        on[:] = True
        on[0] = on[1] = False  # sample 0: nothing at all; sample 1: only a scale
    d.scale_on[1] = True
    out = apply_intensity_changes(x, d, torch.Generator().manual_seed(0))
    assert torch.equal(out[0], x[0])
    assert torch.equal(out[1], x[1] * (1.0 + d.scale[1].float()))
    assert not torch.allclose(out[2:], x[2:], atol=1e-2)


def test_channels_of_a_sample_share_their_change():
    x = torch.rand(6, 1, 32, 32).repeat(1, 3, 1, 1)  # each sample: one image three times
    out = BatchIntensityAugment(AugmentConfig(prob=1.0, noise_std=0.0), seed=1)(x)
    torch.testing.assert_close(out[:, 1:], out[:, :1].expand(-1, 2, -1, -1), rtol=0, atol=1e-5)
    assert not torch.allclose(out[0, 0], out[1, 0], atol=1e-2)  # samples change independently
    noisy = BatchIntensityAugment(AugmentConfig(prob=1.0), seed=1)(x)
    assert not torch.allclose(noisy[:, 0], noisy[:, 1], atol=1e-3)  # noise is drawn per pixel
    assert BatchIntensityAugment(AugmentConfig())(x[:0]).shape == (0, 3, 32, 32)
