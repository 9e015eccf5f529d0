"""Tests of jras_core.metrics: Dice, HD95 and their summaries."""

import math

import numpy as np
import torch

from jras_core.metrics import dice_per_class, hd95_per_class, summarise


def test_dice_on_known_masks():
    target = torch.zeros(1, 10, 10, dtype=torch.long)
    target[0, :, :5] = 1  # 50 px
    pred = torch.zeros_like(target)
    pred[0, :, :4] = 1  # 40 px inside
    d = dice_per_class(pred, target, num_classes=3)
    assert d.shape == (1, 2)
    assert d[0, 0].item() == np.float32(2 * 40 / 90)
    assert math.isnan(d[0, 1].item())  # class 2 absent from both


def test_hd95_uses_spacing():
    target = torch.zeros(1, 20, 20, dtype=torch.long)
    target[0, 5:10, 5:10] = 1
    pred = torch.zeros_like(target)
    pred[0, 5:10, 8:13] = 1  # shifted 3 px along the second axis
    hd1 = hd95_per_class(pred, target, 2, spacing=(1.0, 1.0))[0, 0].item()
    hd2 = hd95_per_class(pred, target, 2, spacing=(1.0, 2.0))[0, 0].item()
    assert hd1 == 3.0
    assert hd2 == 6.0
    # a missed structure costs the image diagonal; a class absent from both is NaN
    missed = hd95_per_class(torch.zeros_like(target), target, 3, spacing=(1.0, 2.0))[0]
    assert missed[0].item() == np.float32(math.sqrt(20**2 + 40**2))
    assert math.isnan(missed[1].item())


def test_summarise_ignores_nan():
    vals = np.array([[1.0, np.nan], [0.5, 0.2]])
    s = summarise(vals, ["A", "B"], "dice")
    assert s["dice_a"] == 0.75 and s["dice_b"] == np.float64(0.2)
    assert math.isclose(s["dice_mean"], (0.75 + 0.2) / 2)
