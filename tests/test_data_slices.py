"""Tests of jras_core.data.slices: preprocessing, slice sets and splits by case."""

from __future__ import annotations

import numpy as np
import pytest
from loader_cases import needs_mnms

from jras_core.config import PreprocessConfig
from jras_core.data.slices import SliceSet, build_slice_set, preprocess_volume
from jras_core.data.volume import DataError, Volume


def _volume(h=80, w=60, z=4, spacing=(2.0, 1.0, 8.0), case="c0"):
    rng = np.random.default_rng(0)
    mask = np.zeros((h, w, z), dtype=np.int64)
    mask[30:50, 20:40, 1:3] = 1
    image = (rng.normal(100, 10, (h, w, z)) + 200 * (mask > 0)).astype(np.float32)
    return Volume(image, mask, spacing, case=case, phase="ED", vendor="X")


def test_preprocess_resamples_to_the_fov_and_keeps_labels():
    cfg = PreprocessConfig(size=64, fov_mm=128.0)  # 2 mm pixels
    img, msk, spacing = preprocess_volume(_volume(), cfg)
    assert img.shape == (4, 64, 64) and msk.shape == (4, 64, 64)
    assert spacing == (2.0, 2.0, 8.0)
    # 20 x 20 voxels of 2 x 1 mm -> 40 x 20 mm -> 20 x 10 pixels of 2 mm
    assert abs(int((msk[1] == 1).sum()) - 200) <= 20
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert set(np.unique(msk)) == {0, 1}


def test_build_slice_set_drops_empty_slices_and_splits_by_case():
    cfg = PreprocessConfig(size=32, fov_mm=None)
    vols = [_volume(case=f"c{i}") for i in range(5)]
    s = build_slice_set(vols, cfg, num_classes=2)
    assert len(s) == 10 and s.slice_pos.tolist()[:2] == [1, 2]
    keep = build_slice_set(vols[:1], PreprocessConfig(size=32, fov_mm=None, keep_empty_slices=True), 2)
    assert len(keep) == 4
    train, val = s.split_by_case(0.4, seed=1)
    assert len(train) + len(val) == len(s)
    assert not {train.cases[c] for c in train.case_ids.tolist()} & {val.cases[c] for c in val.case_ids.tolist()}
    both = SliceSet.concat([train, val])
    assert len(both) == len(s) and len(both.cases) == 10  # tables are concatenated


@needs_mnms
@pytest.mark.parametrize("val_fraction,seed", [(0.2, 0), (0.34, 1), (0.5, 2), (0.8, 3)])
def test_split_by_case_keeps_cases_whole(mnms_slices, val_fraction, seed):
    train, val = mnms_slices.split_by_case(val_fraction, seed)
    train_cases = {train.cases[i] for i in train.case_ids.tolist()}
    val_cases = {val.cases[i] for i in val.case_ids.tolist()}
    assert train_cases and val_cases
    assert not train_cases & val_cases
    assert len(train) + len(val) == len(mnms_slices)


def test_a_site_of_empty_masks_is_an_error_naming_its_files():
    cfg = PreprocessConfig(size=32)
    volumes = [
        Volume(np.ones((40, 40, 2), np.float32), np.zeros((40, 40, 2), np.int64), (1.0, 1.0, 5.0),
               case=f"c{i}", source=f"/data/site/c{i}.nii.gz")
        for i in range(5)
    ]
    with pytest.raises(DataError, match=r"none of the 5 volume\(s\) has a labelled slice .*"
                       r"/data/site/c0\.nii\.gz, /data/site/c1\.nii\.gz, /data/site/c2\.nii\.gz and 2 more"):
        build_slice_set(volumes, cfg, 4)
