"""Tests of jras_core.data.loaders.image_folder: 2-D images and masks, the BUSI sample."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
from fuzzing import FEW, damage_bytes, damages, only_our_error
from hypothesis import given
from loader_cases import BUSI
from PIL import Image

from jras_core.data import DataError, load_image_folder


@pytest.fixture(scope="module")
def busi_volumes():
    if not BUSI.is_dir():
        pytest.skip(f"BUSI fixture not found at {BUSI}")
    return load_image_folder(BUSI, num_classes=2, vendor="busi")


def test_busi_sample_loads(busi_volumes):
    vols = busi_volumes
    assert len(vols) == 40
    assert {v.vendor for v in vols} == {"busi"}
    assert len({v.case for v in vols}) == 40
    for v in vols:
        assert v.image.shape == v.mask.shape and v.image.shape[2] == 1
        assert v.spacing == (1.0, 1.0, 1.0)
        assert set(np.unique(v.mask).tolist()) <= {0, 1}
        assert v.mask.mean() > 0


def test_image_folder_union_rgb_and_gray(tmp_path):
    image = (np.arange(20 * 30).reshape(20, 30) % 256).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "scan.png")
    first = np.zeros((20, 30, 3), dtype=np.uint8)
    first[2:5, 2:5] = 255
    second = np.zeros((20, 30), dtype=np.uint8)
    second[10:12, 10:14] = 255
    Image.fromarray(first).save(tmp_path / "scan_mask.png")
    Image.fromarray(second).save(tmp_path / "scan_mask_1.png")
    Image.fromarray(image).save(tmp_path / "scan1.png")
    Image.fromarray(second > 0).save(tmp_path / "scan1_mask.png")  # 1-bit mask
    vols = {
        v.case: v
        for v in load_image_folder(tmp_path, num_classes=2, vendor="us", spacing=(0.1, 0.1, 1.0))
    }
    assert sorted(vols) == ["scan", "scan1"]
    scan = vols["scan"]
    assert scan.image.shape == (20, 30, 1) and scan.image.dtype == np.float32
    np.testing.assert_array_equal(scan.image[..., 0], image)
    assert scan.mask.sum() == 9 + 8 and scan.mask.max() == 1
    assert vols["scan1"].mask.sum() == 8
    assert scan.spacing == (0.1, 0.1, 1.0) and scan.vendor == "us" and scan.phase == ""


def test_image_folder_errors(tmp_path):
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "alone.png")
    with pytest.raises(DataError, match="alone.png.*mask"):
        load_image_folder(tmp_path)
    Image.fromarray(np.zeros((9, 8), dtype=np.uint8)).save(tmp_path / "alone_mask.png")
    with pytest.raises(DataError, match="does not match"):
        load_image_folder(tmp_path)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "alone_mask.png")
    data = (tmp_path / "alone.png").read_bytes()
    (tmp_path / "alone.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="alone.png"):
        load_image_folder(tmp_path)


_PNG = io.BytesIO()
Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(_PNG, format="PNG")
_PNG_BYTES = _PNG.getvalue()


@FEW
@given(damage=damages)
def test_damaged_png_gives_data_error(damage):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "scan.png").write_bytes(damage_bytes(_PNG_BYTES, *damage))
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "scan_mask.png")
        only_our_error(lambda: load_image_folder(folder, num_classes=2), DataError, "scan")


def test_an_image_over_the_size_limit_is_refused_before_decoding(tmp_path):
    Image.fromarray(np.zeros((200, 300, 3), dtype=np.uint8)).save(tmp_path / "a.png")  # 1.37 MiB as float64
    Image.fromarray(np.zeros((200, 300), dtype=np.uint8)).save(tmp_path / "a_mask.png")
    with pytest.raises(DataError, match=r"a\.png: header declares 200 x 300 x 3 voxels of RGB .*limit of 1\.0 MiB"):
        load_image_folder(tmp_path, max_volume_mib=1)
    assert load_image_folder(tmp_path, max_volume_mib=2)[0].image.shape == (200, 300, 1)
