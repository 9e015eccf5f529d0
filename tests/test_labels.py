"""Tests of jras_core.labels: one-hot masks of the foreground classes."""

from __future__ import annotations

import pytest
import torch

from jras_core.labels import label_ids, one_hot_fg


@pytest.mark.parametrize("dtype", [torch.uint8, torch.long])
def test_one_hot_fg_matches_torch_one_hot(dtype):
    masks = torch.randint(0, 4, (2, 3, 8, 8)).to(dtype)
    expected = torch.nn.functional.one_hot(masks.long(), 4).movedim(-1, -3)[..., 1:, :, :].float()
    out = one_hot_fg(masks, 4)
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    assert torch.equal(one_hot_fg(masks[0, 0], 4), expected[0, 0])  # (H, W) -> (C_fg, H, W)


def test_label_ids_follow_the_label_set_order_case_insensitively():
    assert label_ids(["LV", "MYO", "RV"]) == {"LV": 1, "MYO": 2, "RV": 3}
    assert label_ids(["rv", " Myo ", "lv"]) == {"RV": 1, "MYO": 2, "LV": 3}
