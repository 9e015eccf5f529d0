"""Tests of jras_core.data.spatial: batched spatial changes of images and labels."""

import math

import pytest
import torch

from jras_core.config import AugmentConfig, ConfigError
from jras_core.data.spatial import (
    BatchSpatialAugment,
    SpatialDraw,
    draw_spatial_changes,
    identity_draw,
    make_spatial_draw,
    warp_back,
    warp_images,
    warp_labels,
)


def _draw(batch: int = 6, seed: int = 0, **cfg) -> SpatialDraw:
    return draw_spatial_changes(AugmentConfig(**cfg), batch, torch.Generator().manual_seed(seed))


def _smooth(b: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Random low-frequency images (so that bilinear resampling loses little)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, c, max(h // 8, 2), max(w // 8, 2), generator=g)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)


def _disc(h: int, w: int, radius: float) -> torch.Tensor:
    """``(H, W)`` long: 1 within ``radius`` pixels of the image centre."""
    v = torch.arange(h, dtype=torch.float64) - (h - 1) / 2
    u = torch.arange(w, dtype=torch.float64) - (w - 1) / 2
    return ((v[:, None] ** 2 + u[None, :] ** 2) <= radius**2).long()


def test_identity_config_leaves_the_batch_exactly_as_it_is():
    x, y = torch.rand(3, 2, 16, 20), torch.randint(0, 4, (3, 16, 20))
    aug = BatchSpatialAugment(AugmentConfig(prob=1.0))  # no flip, no rotation, no zoom
    assert not aug.enabled
    xo, yo, d = aug(x, y)
    assert xo is x and yo is y
    assert torch.equal(d.matrices, torch.eye(2, 3).expand(3, 2, 3))
    assert torch.equal(_draw(5, prob=1.0).matrices, torch.eye(2, 3).expand(5, 2, 3))
    # identity draws copy exactly (no resampling rounding), also through the warp functions
    assert torch.equal(warp_images(x, identity_draw(3)), x)
    assert torch.equal(warp_labels(y, identity_draw(3)), y)
    assert torch.equal(warp_back(x, identity_draw(3)), x)
    for on in (AugmentConfig(flip=True), AugmentConfig(rotate_deg=5.0), AugmentConfig(scale=0.1)):
        assert BatchSpatialAugment(on).enabled


def test_a_positive_quarter_turn_is_rot90_clockwise():
    """``angle = +90`` equals ``torch.rot90(x, k=-1, dims=(-2, -1))`` (clockwise on screen,
    rows going down); the other direction is a different image."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 24, 24)
    y = torch.randint(0, 4, (2, 24, 24))
    d = make_spatial_draw(90.0, batch=2)
    torch.testing.assert_close(warp_images(x, d), torch.rot90(x, -1, dims=(-2, -1)), rtol=0, atol=1e-5)
    assert torch.equal(warp_labels(y, d), torch.rot90(y, -1, dims=(-2, -1)))
    assert not torch.allclose(warp_images(x, d), torch.rot90(x, 1, dims=(-2, -1)), atol=0.1)
    back = make_spatial_draw(-90.0, batch=2)
    assert torch.equal(warp_labels(y, back), torch.rot90(y, 1, dims=(-2, -1)))
    # a quarter turn about the centre of a non-square slice: the centred square turns in place
    wide = torch.zeros(1, 20, 30, dtype=torch.long)
    wide[:, :, 5:25] = torch.randint(1, 4, (1, 20, 20))
    turned = warp_labels(wide, make_spatial_draw(90.0))
    assert torch.equal(turned[:, :, 5:25], torch.rot90(wide[:, :, 5:25], -1, dims=(-2, -1)))
    assert not turned[:, :, :5].any() and not turned[:, :, 25:].any()


def test_flips_are_torch_flip():
    torch.manual_seed(1)
    x = torch.rand(4, 2, 12, 17)
    y = torch.randint(0, 5, (4, 3, 12, 17))
    fh, fw = torch.tensor([False, True, False, True]), torch.tensor([False, False, True, True])
    d = make_spatial_draw(0.0, 1.0, fh, fw)
    expected_x = torch.stack([x[0], x[1].flip(-2), x[2].flip(-1), x[3].flip(-2, -1)])
    expected_y = torch.stack([y[0], y[1].flip(-2), y[2].flip(-1), y[3].flip(-2, -1)])
    torch.testing.assert_close(warp_images(x, d), expected_x, rtol=0, atol=1e-5)
    assert torch.equal(warp_labels(y, d), expected_y)
    assert torch.equal(warp_images(x, d)[0], x[0])  # the unflipped sample exactly


def test_zoom_two_doubles_a_centred_disc():
    y = _disc(64, 64, 8.0).expand(2, 64, 64)
    d = make_spatial_draw(0.0, torch.tensor([2.0, 0.5]))
    out = warp_labels(y, d)
    area = y[0].sum().item()
    assert abs(out[0].sum().item() / area - 4.0) < 0.15  # radius 8 -> 16
    assert abs(out[1].sum().item() / area - 0.25) < 0.05  # radius 8 -> 4
    rows = out[0].any(dim=1).nonzero()
    assert rows.max() - rows.min() + 1 in (31, 32, 33)  # diameter 17 -> ~33 pixels
    img = warp_images(y[:1, None].float(), make_spatial_draw(0.0, 2.0))
    assert abs(img.sum().item() / area - 4.0) < 0.1


def test_channels_and_labels_share_the_transform():
    torch.manual_seed(2)
    b, h, w = 5, 32, 40
    labels = torch.zeros(b, h, w, dtype=torch.long)
    for i in range(b):  # an off-centre, asymmetric blob per sample
        labels[i, 4 + i : 14 + i, 6 + 2 * i : 24 + i] = 1
        labels[i, 8 + i : 11 + i, 20 + i : 30 + i] = 2
    d = _draw(b, seed=3, prob=1.0, flip=True, rotate_deg=90.0, scale=0.3)
    assert len(set(d.angle.tolist())) == b
    image = _smooth(b, 1, h, w)
    one_hot = torch.stack([(labels == cls).float() for cls in (1, 2)], dim=1)
    out = warp_images(torch.cat([image, image, one_hot], dim=1), d)
    assert torch.equal(out[:, 0], out[:, 1])
    warped = warp_labels(labels, d)
    grid = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).float()
    for i in range(b):
        for k, cls in enumerate((1, 2)):
            soft, hard = out[i, 2 + k], warped[i] == cls
            assert hard.sum() > 10
            # each class channel, interpolated bilinearly, lies where the nearest-neighbour label is
            assert ((soft > 0.5) != hard).float().sum() <= 0.25 * hard.sum()
            centre = (grid * soft[..., None]).sum((0, 1)) / soft.sum()
            assert (hard.nonzero().float().mean(0) - centre).abs().max() < 0.5


def test_matches_monai_affine():
    """Same angle and zoom as MONAI's ``Affine(rotate_params=radians(angle), scale_params=1 /
    zoom)``: MONAI builds its grid in centred pixel coordinates with the same pixel-centre
    convention (``align_corners=False``) and samples with ``grid_sample``, so the only
    difference is float32 rounding of the sampling coordinates: images agree within 1e-4,
    nearest-neighbour labels exactly. A non-square slice checks the aspect handling."""
    from monai.transforms import Affine

    torch.manual_seed(3)
    img = torch.rand(2, 40, 48)
    lab = torch.randint(0, 4, (1, 40, 48))
    for angle, zoom in ((23.0, 1.25), (-61.0, 0.8), (90.0, 1.0), (170.0, 1.1)):
        d = make_spatial_draw(angle, zoom)
        params = dict(rotate_params=math.radians(angle), scale_params=(1 / zoom, 1 / zoom), padding_mode="zeros")
        ref = torch.as_tensor(Affine(mode="bilinear", image_only=True, **params)(img))
        torch.testing.assert_close(warp_images(img[None], d)[0], ref, rtol=0, atol=1e-4)
        ref_lab = torch.as_tensor(Affine(mode="nearest", image_only=True, **params)(lab.float()))
        assert torch.equal(warp_labels(lab, d), ref_lab.round().long())
        assert not torch.allclose(warp_images(img[None], d)[0], img, atol=0.1)


def test_warp_back_inverts_warp_images_in_the_interior():
    b, h, w = 6, 48, 56
    x = _smooth(b, 2, h, w, seed=4)
    d = _draw(b, seed=5, prob=1.0, flip=True, rotate_deg=45.0, scale=0.2)
    assert (d.angle.abs() > 1.0).all()
    back = warp_back(warp_images(x, d), d)
    # where the round trip keeps the whole image: a ones image stays 1 there, eroded by a pixel
    ones = warp_back(warp_images(torch.ones(b, 1, h, w), d), d)
    inside = -torch.nn.functional.max_pool2d(-ones, 3, stride=1, padding=1) > 1 - 1e-4
    assert (inside.float().mean((1, 2, 3)) > 0.3).all()
    err = (back - x).abs() * inside
    assert err.max() < 0.03
    assert (warp_images(x, d) - x).abs().amax((1, 2, 3)).min() > 0.1  # the warp itself changed every sample
    # the inverse of a quarter turn on a non-square slice, on the centred square
    lab = torch.zeros(1, 1, 20, 30)
    lab[..., 5:25] = torch.rand(1, 1, 20, 20)
    q = make_spatial_draw(90.0)
    torch.testing.assert_close(warp_back(warp_images(lab, q), q)[..., 5:25], lab[..., 5:25], rtol=0, atol=1e-5)


def test_draws_are_seeded_per_sample_and_follow_the_configuration():
    cfg = dict(prob=0.5, flip=True, rotate_deg=30.0, scale=0.2)
    a, b, c = _draw(400, 7, **cfg), _draw(400, 7, **cfg), _draw(400, 8, **cfg)
    for name in ("matrices", "angle", "zoom", "flip_h", "flip_w"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.matrices, c.matrices)
    assert a.matrices.dtype == torch.float32 and a.matrices.shape == (400, 2, 3)
    on = a.angle != 0
    assert abs(on.float().mean().item() - 0.5) < 0.08
    assert torch.equal(on, a.zoom != 1)  # rotation and zoom come together
    assert len(set(a.angle[on].tolist())) == int(on.sum())  # every drawn sample its own angle
    assert a.angle.abs().max() <= 30 and a.angle[on].abs().max() > 25
    assert 0.8 <= a.zoom.min() and a.zoom.max() <= 1.2
    for flips in (a.flip_h, a.flip_w):
        assert abs(flips.float().mean().item() - 0.5) < 0.08
    assert abs((a.flip_h & a.flip_w).float().mean().item() - 0.25) < 0.07
    # never drawn: prob 0, or no flip
    none = _draw(50, 7, prob=0.0, rotate_deg=30.0, scale=0.2)
    assert torch.equal(none.matrices, torch.eye(2, 3).expand(50, 2, 3))
    x, y = torch.rand(50, 1, 8, 8), torch.randint(0, 3, (50, 8, 8))
    xo, yo, _ = BatchSpatialAugment(AugmentConfig(prob=0.0, rotate_deg=30.0, scale=0.2))(x, y)
    assert torch.equal(xo, x) and torch.equal(yo, y)
    assert not _draw(50, 7, prob=1.0, rotate_deg=30.0).flip_h.any()
    # the augment object draws afresh each call, repeatably from its seed
    aug1, aug2 = BatchSpatialAugment(AugmentConfig(**cfg), seed=1), BatchSpatialAugment(AugmentConfig(**cfg), seed=1)
    first, second = aug1.draw(8), aug1.draw(8)
    assert not torch.equal(first.matrices, second.matrices)
    assert torch.equal(aug2.draw(8).matrices, first.matrices)


def test_shapes_dtypes_and_errors():
    d = _draw(3, seed=1, prob=1.0, rotate_deg=20.0, scale=0.1)
    x = torch.rand(3, 2, 16, 16, dtype=torch.float64)
    assert warp_images(x, d).dtype == torch.float64
    for dtype in (torch.uint8, torch.int32, torch.long):
        y = torch.randint(0, 4, (3, 2, 16, 16)).to(dtype)
        out = warp_labels(y, d)
        assert out.dtype == dtype and out.shape == y.shape
        assert set(out.unique().tolist()) <= {0, 1, 2, 3}
    assert warp_images(x[:0], _draw(0)).shape == (0, 2, 16, 16)
    with pytest.raises(ValueError, match="draw of 3 samples"):
        warp_images(torch.rand(2, 1, 8, 8), d)
    with pytest.raises(ValueError, match="integer"):
        warp_labels(torch.rand(3, 8, 8), d)
    with pytest.raises(ValueError, match="zoom"):
        make_spatial_draw(0.0, 0.0)
    for bad in (dict(rotate_deg=-1.0), dict(rotate_deg=190.0), dict(scale=1.0), dict(scale=-0.1)):
        with pytest.raises(ConfigError):
            AugmentConfig(**bad).validate()
    AugmentConfig(flip=True, rotate_deg=180.0, scale=0.5).validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda_like_on_the_cpu():
    d = _draw(4, seed=2, prob=1.0, flip=True, rotate_deg=90.0, scale=0.3)
    x, y = _smooth(4, 3, 32, 40), torch.randint(0, 4, (4, 32, 40))
    torch.testing.assert_close(warp_images(x.cuda(), d).cpu(), warp_images(x, d), rtol=0, atol=1e-4)
    torch.testing.assert_close(warp_back(x.cuda(), d).cpu(), warp_back(x, d), rtol=0, atol=1e-4)
    assert (warp_labels(y.cuda(), d).cpu() != warp_labels(y, d)).float().mean() < 1e-3
