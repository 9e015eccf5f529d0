"""Tests of jras_core.data.slices: preprocessing, slice sets and splits by case."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from loader_cases import needs_mnms
from shared_data import SHARED, needs

from jras_core.config import PreprocessConfig
from jras_core.data.loaders import load_manifest
from jras_core.data.slices import SliceSet, build_slice_set, preprocess_volume, restore_labels
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


@pytest.mark.parametrize("h,w", [(61, 70), (75, 64), (32, 32), (63, 81), (100, 20)])
def test_restore_labels_undoes_the_crop_and_pad_exactly(h: int, w: int):
    """Without resampling the inverse is exact: every voxel inside the slice comes back to its
    place, whatever the parity of the sizes; what the crop cut away comes back as background."""
    cfg = PreprocessConfig(size=64, fov_mm=None)
    rng = np.random.default_rng(h * w)
    mask = rng.integers(0, 4, size=(h, w, 3))
    vol = Volume(np.zeros((h, w, 3), dtype=np.float32), mask, (1.0, 1.0, 5.0), case="c")
    _, msk, _ = preprocess_volume(vol, cfg)
    back = restore_labels(msk, (h, w, 3), (1.0, 1.0, 5.0), cfg)
    assert back.shape == (h, w, 3) and back.dtype == np.uint8
    rows = slice((h - 64) // 2, (h - 64) // 2 + 64) if h > 64 else slice(None)
    cols = slice((w - 64) // 2, (w - 64) // 2 + 64) if w > 64 else slice(None)
    np.testing.assert_array_equal(back[rows, cols], mask[rows, cols])
    assert int((back > 0).sum()) == int((msk > 0).sum())  # nothing invented outside the crop


@needs("acdc", "mnms-sample")
@pytest.mark.parametrize("manifest,case", [("acdc", "patient005"), ("mnms-sample", "G1K1V3"), ("mnms-sample", "C8O0P2")])
def test_restore_labels_maps_a_resampled_mask_back_onto_the_native_grid(manifest: str, case: str):
    """Real masks resampled to 128 px over 240 mm as the images are (linear, centred pixels: here
    each class's one-hot map) and cropped, then restored: each structure overlaps its original
    (Dice above 0.93) and its centre moves by less than a quarter of a native pixel."""
    import torch
    from monai.transforms import Resize, ResizeWithPadOrCrop

    from jras_core.data.slices import resampled_shape

    cfg = PreprocessConfig(size=128, fov_mm=240.0)
    vol = load_manifest(SHARED / manifest / "manifest.csv", 4, where={"case": case, "phase": "ED"})[0]
    h, w, z = vol.mask.shape
    onehot = torch.nn.functional.one_hot(torch.as_tensor(vol.mask), 4).permute(3, 0, 1, 2).float()
    maps = Resize((*resampled_shape((h, w), vol.spacing, cfg), z), mode="trilinear")(onehot)
    maps = ResizeWithPadOrCrop((cfg.size, cfg.size, -1))(maps)
    preprocessed = np.moveaxis(np.asarray(maps.argmax(0)), -1, 0)  # (Z, S, S)
    back = restore_labels(preprocessed, (h, w, z), vol.spacing, cfg)
    assert back.shape == vol.mask.shape
    for label in (1, 2, 3):
        a, b = back == label, vol.mask == label
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.93
        assert np.all(np.abs(np.argwhere(a).mean(0) - np.argwhere(b).mean(0)) < 0.25)


@pytest.mark.parametrize("spacing", [(1.25, 1.25, 8.0), (1.56, 1.4, 10.0), (0.7, 0.9, 5.0)])
def test_resampled_masks_stay_on_their_image(spacing):
    """A disc whose image is its own indicator: after resampling to the slices' pixel size the
    mask's centroid is the image's (within a tenth of a pixel) and the mask is the image
    above one half. Nearest-neighbour resampling moved it by 0.2 to 0.6 pixel."""
    h, w = 150, 131
    yy, xx = np.mgrid[0:h, 0:w]
    disc = (((yy - 71.3) * spacing[0]) ** 2 + ((xx - 60.8) * spacing[1]) ** 2 <= 30.0**2).astype(np.float32)
    vol = Volume(np.repeat(disc[:, :, None], 2, axis=2), np.repeat(disc[:, :, None], 2, axis=2).astype(np.int64),
                 spacing, case="disc")
    cfg = PreprocessConfig(size=96, fov_mm=240.0, intensity_percentiles=(0.0, 100.0))
    image, mask, _ = preprocess_volume(vol, cfg)
    img, msk = image[0], mask[0].astype(np.float64)
    grid = np.mgrid[0 : cfg.size, 0 : cfg.size]
    centre_image = [(g * img).sum() / img.sum() for g in grid]
    centre_mask = [(g * msk).sum() / msk.sum() for g in grid]
    np.testing.assert_allclose(centre_mask, centre_image, atol=0.1)
    inside = img > 0.5
    assert (inside == (msk > 0)).mean() > 0.998


def test_a_stream_of_volumes_is_read_one_case_at_a_time(tmp_path):
    """``stream=True`` reads nothing up front; each case is read when reached (a bad one
    raises there, or is skipped with ``skip_bad``), and the slices equal those of a list."""
    from loader_cases import toy_pair, write_case, write_manifest

    image, mask = toy_pair(h=40, w=40, z=3)
    rows = [write_case(tmp_path, f"c{i}", image + i, mask) for i in range(3)]
    (tmp_path / "c2.nii.gz").write_bytes(b"not a NIfTI file")
    manifest = write_manifest(tmp_path, rows)
    stream = load_manifest(manifest, num_classes=4, stream=True)
    it = iter(stream)
    assert next(it).case == "c0" and next(it).case == "c1"
    with pytest.raises(DataError, match="c2.nii.gz"):
        next(it)
    cfg = PreprocessConfig(size=32, fov_mm=None)
    kept = load_manifest(manifest, num_classes=4, stream=True, skip_bad=True)
    streamed = build_slice_set(kept, cfg, num_classes=4)
    listed = build_slice_set(load_manifest(manifest, num_classes=4, skip_bad=True), cfg, num_classes=4)
    assert streamed.cases == ["c0", "c1"] and torch.equal(streamed.images, listed.images)
    assert torch.equal(streamed.masks, listed.masks)


def test_partition_parts_are_views_of_one_copy_and_the_cache_is_exact(tmp_path):
    cfg = PreprocessConfig(size=32, fov_mm=None)
    s = build_slice_set([_volume(case=f"c{i}") for i in range(5)], cfg, num_classes=2)
    whole, train, val = s.partition(s.validation_cases(0.4, seed=1))
    assert len(train) + len(val) == len(s) == len(whole)
    base = whole.images.untyped_storage().data_ptr()
    for part in (train, val):
        assert part.images.untyped_storage().data_ptr() == base  # no copy of its own
    # the same slices, in the same order within each part, as picking the rows out one by one
    is_val = torch.tensor([c in s.validation_cases(0.4, seed=1) for c in s.case_ids.tolist()])
    assert torch.equal(val.images, s.images[is_val]) and torch.equal(train.masks, s.masks[~is_val])
    assert [len(p) for p in s.split_by_case(0.4, seed=1)] == [len(train), len(val)]
    # intensities lie on float16's grid: the 16-bit cache gives back the very same values,
    # and a part writes its own rows only
    assert torch.equal(s.images.half().float(), s.images)
    arrays, meta = val.to_arrays()
    again = SliceSet.from_arrays(arrays, meta)
    assert again.images.dtype == torch.float32 and torch.equal(again.images, val.images)
    assert torch.equal(again.case_ids, val.case_ids)
    assert arrays["images"].dtype == np.float16 and arrays["images"].nbytes == val.images.nbytes // 2
