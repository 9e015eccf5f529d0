"""Tests of jras_core.data.loaders.acdc: the official ACDC layout."""

from __future__ import annotations

import pytest

from jras_core.data import DataError, load_acdc


def test_acdc_layout_remaps_labels(acdc_root):
    vols = load_acdc(acdc_root, num_classes=4)
    assert sorted(v.key for v in vols) == [
        "patient001_ED",
        "patient001_ES",
        "patient002_ED",
        "patient002_ES",
    ]
    for v in vols:
        assert (v.mask[0:2] == 3).all(), "ACDC RV (1) must become M&Ms RV (3)"
        assert (v.mask[4:6] == 1).all(), "ACDC LV (3) must become M&Ms LV (1)"
        assert v.vendor == "ACDC"
    raw = load_acdc(acdc_root, num_classes=4, label_map=None)
    assert (raw[0].mask[0:2] == 1).all()


def test_acdc_missing_frame_file(acdc_root):
    (acdc_root / "training" / "patient002" / "patient002_frame02_gt.nii.gz").unlink()
    with pytest.raises(DataError, match="patient002_frame02_gt.nii.gz"):
        load_acdc(acdc_root)
    assert {v.case for v in load_acdc(acdc_root, skip_bad=True)} == {"patient001"}
