"""Tests of jras_core.retrieval.guides: centroids, grids, guide alignment, centred Dice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from discs import disc

from jras_core.retrieval.guides import (
    align_guides,
    centred_dice,
    centred_one_hot,
    centroids,
    translate,
    translation_grid,
)


def test_centroid_and_translation():
    m = disc(10, 20, 4).float().unsqueeze(0)
    cent, valid = centroids(m)
    size = 32
    assert valid.all()
    # normalised coordinates: pixel p -> -1 + 2p/(size-1)
    assert cent[0, 0] == pytest.approx(-1 + 2 * 10 / (size - 1), abs=1e-4)
    assert cent[0, 1] == pytest.approx(-1 + 2 * 20 / (size - 1), abs=1e-4)
    shifted = translate(m.unsqueeze(1), torch.tensor([[2 * 6 / (size - 1), 0.0]]), mode="nearest")[:, 0]
    assert torch.equal(shifted[0].long(), disc(16, 20, 4))
    empty_cent, empty_valid = centroids(torch.zeros(1, size, size))
    assert not empty_valid.any()


def test_align_guides_moves_guides_onto_query_centroid():
    guide_masks = torch.stack([disc(8, 8, 3), disc(24, 20, 4)]).unsqueeze(0)  # (1, 2, H, W)
    guide_images = guide_masks.float().unsqueeze(2)
    target = centroids(disc(16, 16, 3).float().unsqueeze(0))[0]
    imgs, masks = align_guides(guide_images, guide_masks, target, torch.tensor([True]))
    new_cent, _ = centroids((masks[0] > 0).float())
    assert torch.allclose(new_cent, target.expand(2, 2), atol=0.05)
    assert imgs.shape == guide_images.shape


def test_centred_dice_is_shift_invariant():
    a = disc(10, 10, 5).unsqueeze(0)
    b = torch.stack([disc(20, 18, 5), disc(20, 18, 2), torch.zeros(32, 32, dtype=torch.long)])
    d = centred_dice(centred_one_hot(a, 2), centred_one_hot(b, 2))
    assert d.shape == (1, 3)
    assert d[0, 0] > 0.95
    assert d[0, 1] < 0.5
    assert d[0, 2] == 0.0


def test_translation_grid_is_affine_grid_of_a_translation():
    from jras_core.retrieval.guides import translation_grid

    offsets = torch.tensor([[0.3, -0.2], [0.0, 0.0], [-1.1, 0.7]])
    theta = torch.zeros(3, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = -offsets
    expected = torch.nn.functional.affine_grid(theta, (3, 1, 5, 7), align_corners=True)
    torch.testing.assert_close(translation_grid(offsets, 5, 7), expected, atol=1e-6, rtol=0)


def test_similarity_grid_is_a_translation_at_scale_one_and_magnifies_about_the_target():
    from jras_core.retrieval.guides import similarity_grid, translation_grid

    target, source = torch.tensor([[0.2, -0.1], [-0.5, 0.4]]), torch.tensor([[-0.3, 0.0], [0.1, 0.1]])
    torch.testing.assert_close(similarity_grid(target, source, torch.ones(2), 9, 11),
                               translation_grid(target - source, 9, 11), atol=1e-6, rtol=0)
    # a disc of radius 4 around (8, 8), doubled about the target (16, 16): radius 8 around the target
    size = 32
    guide = disc(8, 8, 4).float()[None, None]
    grid = similarity_grid(torch.full((1, 2), -1 + 32 / (size - 1)), torch.full((1, 2), -1 + 16 / (size - 1)),
                           torch.tensor([2.0]), size, size)
    out = torch.nn.functional.grid_sample(guide, grid, mode="nearest", align_corners=True)[0, 0]
    assert abs(int(out.sum()) - int(disc(16, 16, 8).sum())) <= 8
    expected = disc(16, 16, 8).float()
    assert float(2 * (out * expected).sum() / (out.sum() + expected.sum())) > 0.9


def test_align_guides_scales_guides_to_the_given_magnification():
    guide_masks = torch.stack([disc(8, 8, 3), disc(24, 20, 6), disc(20, 10, 4)]).unsqueeze(0)  # (1, 3, H, W)
    guide_images = guide_masks.float().unsqueeze(2)
    target = centroids(disc(16, 16, 3).float().unsqueeze(0))[0]
    scales = torch.tensor([[2.0, 0.5, 1.0]])
    _, masks = align_guides(guide_images, guide_masks, target, torch.tensor([True]), scales=scales)
    areas = (masks[0] > 0).flatten(1).sum(1).float()
    before = (guide_masks[0] > 0).flatten(1).sum(1).float()
    torch.testing.assert_close(areas / before, scales[0] ** 2, atol=0.0, rtol=0.2)
    new_cent, _ = centroids((masks[0] > 0).float())
    assert torch.allclose(new_cent, target.expand(3, 2), atol=0.05)
    # scale 1 is the translation alone
    shifted = align_guides(guide_images, guide_masks, target, torch.tensor([True]))
    assert torch.equal(masks[0, 2], shifted[1][0, 2])
    # a query without a centroid leaves its guides in place, scaled or not
    still = align_guides(guide_images, guide_masks, target, torch.tensor([False]), scales=scales)
    assert torch.equal(still[1], guide_masks)


@pytest.mark.parametrize("hw", [(32, 32), (17, 40)])
def test_translation_grid_equals_affine_grid(hw):
    h, w = hw
    offsets = (torch.rand(6, 2) - 0.5) * 2
    theta = torch.zeros(6, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = -offsets
    assert torch.equal(translation_grid(offsets, h, w), F.affine_grid(theta, [6, 1, h, w], align_corners=True))
    images = torch.rand(6, 2, h, w)
    expected = F.grid_sample(images, F.affine_grid(theta, [6, 2, h, w], align_corners=True), align_corners=True)
    assert torch.equal(translate(images, offsets), expected)
