"""Tests of jras_core.data.loaders.common: NIfTI reading, the checks of a case, label remapping."""

from __future__ import annotations

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fuzzing import FEW, damage_bytes, damages, only_our_error
from hypothesis import given, settings
from hypothesis import strategies as st
from loader_cases import (
    HEADER,
    fractional_mask_case,
    header_only_nifti,
    label_seven_case,
    missing_file_case,
    nan_image_case,
    shape_mismatch_case,
    toy_pair,
    truncated_case,
    write_case,
    write_manifest,
)

from jras_core.data import DataError, load_manifest, remap_labels


def test_manifest_2d_4d_and_float_masks(tmp_path):
    image, mask = toy_pair()
    rows = [
        write_case(tmp_path, "flat", image[:, :, 0], mask[:, :, 0]),
        write_case(tmp_path, "four", image[..., None], mask[..., None].astype(np.float64)),
    ]
    vols = load_manifest(write_manifest(tmp_path, rows), num_classes=4)
    assert vols[0].image.shape == (12, 10, 1)
    assert vols[1].image.shape == (12, 10, 3)
    assert vols[1].mask.dtype == np.int64
    np.testing.assert_array_equal(vols[1].mask, mask)
    assert vols[0].spacing == pytest.approx((1.25, 1.25, 1.0))  # a 2-D header has no slice size
    assert vols[1].spacing == pytest.approx((1.25, 1.25, 8.0))


@pytest.mark.parametrize(
    "make,problem",
    [
        (truncated_case, "truncated"),
        (shape_mismatch_case, "does not match"),
        (label_seven_case, r"labels \[7\]"),
        (nan_image_case, "NaN"),
        (fractional_mask_case, "non-integer"),
        (missing_file_case, "not found"),
    ],
    ids=["truncated", "shape", "label7", "nan", "fractional", "missing"],
)
def test_bad_case_raises_naming_file(tmp_path, make, problem):
    rows, culprit = make(tmp_path)
    path = write_manifest(tmp_path, rows)
    with pytest.raises(DataError, match=problem) as info:
        load_manifest(path, num_classes=4)
    assert culprit in str(info.value)


@settings(max_examples=60, deadline=None)
@given(
    perm=st.permutations(list(range(6))),
    mask=st.lists(st.integers(0, 7), min_size=1, max_size=40),
)
def test_remap_labels_permutation_is_invertible(perm, mask):
    mapping = dict(enumerate(perm))
    inverse = {new: old for old, new in mapping.items()}
    arr = np.asarray(mask, dtype=np.int64)
    out = remap_labels(arr, mapping)
    assert out.dtype == np.int64 and out.shape == arr.shape
    np.testing.assert_array_equal(remap_labels(out, inverse), arr)


def _nifti_bytes(data: np.ndarray) -> bytes:
    img = nib.Nifti1Image(data, np.diag([1.25, 1.25, 8.0, 1.0]))
    return img.to_bytes()


_GOOD_IMAGE = np.random.default_rng(0).normal(100, 10, (8, 8, 2)).astype(np.float32)
_GOOD_MASK = np.zeros((8, 8, 2), np.uint8)
_GOOD_MASK[2:5, 2:5] = 1
_IMAGE_BYTES = _nifti_bytes(_GOOD_IMAGE)


@FEW
@given(damage=damages)
def test_damaged_nifti_gives_data_error(damage):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "img.nii").write_bytes(damage_bytes(_IMAGE_BYTES, *damage))
        (folder / "img_gt.nii").write_bytes(_nifti_bytes(_GOOD_MASK))
        (folder / "manifest.csv").write_text(HEADER + "c1,ED,A,1,img.nii,img_gt.nii\n")
        only_our_error(lambda: load_manifest(folder / "manifest.csv", num_classes=4), DataError, "img.nii")


@FEW
@given(
    nan_at=st.one_of(st.none(), st.integers(0, 127)),
    labels=st.lists(st.integers(-2, 6), min_size=1, max_size=5),
    mask_shape=st.sampled_from([(8, 8, 2), (8, 7, 2), (8, 8, 1)]),
)
def test_volume_checks_match_the_data(nan_at, labels, mask_shape):
    """NaN intensities, labels outside 0..3 and image/mask shape mismatches are refused,
    naming the file; anything else loads."""
    image = _GOOD_IMAGE.copy()
    if nan_at is not None:
        image.flat[nan_at] = np.nan
    mask = np.zeros(mask_shape, np.int16)
    mask.flat[: len(labels)] = labels
    bad = nan_at is not None or mask_shape != image.shape or any(v < 0 or v > 3 for v in labels)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "img.nii").write_bytes(_nifti_bytes(image))
        (folder / "img_gt.nii").write_bytes(_nifti_bytes(mask))
        (folder / "manifest.csv").write_text(HEADER + "c1,ED,A,1,img.nii,img_gt.nii\n")
        try:
            vols = load_manifest(folder / "manifest.csv", num_classes=4)
        except DataError as exc:
            assert bad and "img" in str(exc), str(exc)
        else:
            assert not bad and np.array_equal(vols[0].mask, mask.astype(np.int64))


@pytest.mark.parametrize("name", ["huge.nii.gz", "huge.nii"])
def test_a_volume_over_the_size_limit_is_refused_from_its_header(tmp_path, name):
    """A tiny file (compressed, or plain as a sparse file would be) declaring 12000 x 12000 x 8
    voxels (8.6 GiB when read) is refused from its header: the error names the file, its
    shape and the limit, and no voxel memory is allocated."""
    import time
    import tracemalloc

    huge = header_only_nifti(tmp_path / name, (12000, 12000, 8))
    assert huge.stat().st_size < 1024
    path = write_manifest(tmp_path, [("huge", huge.name, huge.name)])
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(DataError) as info:
            load_manifest(path, num_classes=4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert str(huge) in message and "12000 x 12000 x 8" in message and "8.58 GiB" in message
    assert "limit of 512.0 MiB" in message and "max_volume_mib" in message
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB allocated while refusing"
    assert time.perf_counter() - t0 < 2.0


def test_the_volume_size_limit_is_configurable(tmp_path):
    image, mask = toy_pair(64, 64, 8)  # 32768 voxels: 0.25 MiB as float64
    path = write_manifest(tmp_path, [write_case(tmp_path, "c", image, mask)])
    assert len(load_manifest(path, num_classes=4, max_volume_mib=1)) == 1
    with pytest.raises(DataError, match=r"c\.nii\.gz: header declares 64 x 64 x 8 voxels of float32"):
        load_manifest(path, num_classes=4, max_volume_mib=0.1)
    assert len(load_manifest(path, num_classes=4, max_volume_mib=None)) == 1


def test_read_nifti_image_reads_an_unlabelled_image_and_names_bad_ones(tmp_path):
    from jras_core.data.loaders import read_nifti_image

    image, _ = toy_pair()
    affine = np.diag([1.5, 1.25, 8.0, 1.0])
    nib.save(nib.Nifti1Image(image[:, :, 0], affine), str(tmp_path / "flat.nii.gz"))
    data, spacing, img = read_nifti_image(tmp_path / "flat.nii.gz")
    assert data.shape == (12, 10, 1) and data.dtype == np.float32
    assert spacing == (1.5, 1.25, 1.0)  # a 2-D image's missing third zoom is 1 mm
    assert img.shape == (12, 10)
    np.testing.assert_allclose(img.affine, affine)
    nib.save(nib.Nifti1Image(np.repeat(image[..., None], 2, axis=3), affine), str(tmp_path / "cine.nii.gz"))
    with pytest.raises(DataError, match=r"cine.nii.gz: expected a 2-D or 3-D volume"):
        read_nifti_image(tmp_path / "cine.nii.gz")
    with pytest.raises(DataError, match="missing.nii.gz: NIfTI file not found"):
        read_nifti_image(tmp_path / "missing.nii.gz")
