"""Tests of jras_core.data.loaders.mnms: the official M&Ms layout."""

from __future__ import annotations

import numpy as np
import pytest
from loader_cases import save_nifti

from jras_core.data import DataError, load_mnms


def _cine(code: str, frames: int, ed: int, es: int) -> tuple[np.ndarray, np.ndarray]:
    """Image ``(H, W, Z, T)`` whose value is the frame index; mask labelled at ED/ES only."""
    image = np.broadcast_to(np.arange(frames, dtype=np.float32), (8, 9, 2, frames)).copy()
    mask = np.zeros((8, 9, 2, frames), dtype=np.uint8)
    mask[1:3, 1:3, :, ed] = 1
    mask[4:6, 4:6, :, es] = 3
    return image, mask


@pytest.fixture
def mnms_layout(tmp_path):
    root = tmp_path / "MnM"
    cases = {"AAA111": ("A", 1, 0, 3), "BBB222": ("B", 2, 1, 4)}
    for code, (_, _, ed, es) in cases.items():
        folder = root / "Training" / "Labeled" / code
        folder.mkdir(parents=True)
        image, mask = _cine(code, 5, ed, es)
        save_nifti(folder / f"{code}_sa.nii.gz", image, spacing=(1.3, 1.3, 9.0))
        save_nifti(folder / f"{code}_sa_gt.nii.gz", mask, spacing=(1.3, 1.3, 9.0))
    unlabelled = root / "Training" / "Unlabeled" / "CCC333"
    unlabelled.mkdir(parents=True)
    save_nifti(unlabelled / "CCC333_sa.nii.gz", _cine("CCC333", 5, 0, 2)[0])
    info = tmp_path / "info.csv"
    lines = [",External code,VendorName,Vendor,Centre,ED,ES"]
    lines += [
        f"{i},{c},Name{v},{v},{ctr},{ed},{es}"
        for i, (c, (v, ctr, ed, es)) in enumerate(cases.items())
    ]
    lines += ["2,CCC333,GE,C,4,0,2", "3,ZZZ999,GE,D,5,0,9"]
    info.write_text("\n".join(lines) + "\n")
    return root, info


def test_mnms_official_layout(mnms_layout):
    root, info = mnms_layout
    vols = load_mnms(root, info, num_classes=4)
    assert sorted(v.key for v in vols) == ["AAA111_ED", "AAA111_ES", "BBB222_ED", "BBB222_ES"]
    by_key = {v.key: v for v in vols}
    assert by_key["AAA111_ES"].image.max() == 3.0 and by_key["BBB222_ED"].image.max() == 1.0
    assert set(np.unique(by_key["AAA111_ED"].mask).tolist()) == {0, 1}
    assert set(np.unique(by_key["AAA111_ES"].mask).tolist()) == {0, 3}
    assert by_key["BBB222_ES"].vendor == "B" and by_key["BBB222_ES"].centre == "2"
    assert by_key["AAA111_ED"].image.shape == (8, 9, 2)
    assert by_key["AAA111_ED"].spacing == pytest.approx((1.3, 1.3, 9.0))
    assert {v.vendor for v in load_mnms(root, info, vendors=["A"])} == {"A"}


def test_mnms_frame_out_of_range(mnms_layout, tmp_path):
    root, info = mnms_layout
    info.write_text(",External code,Vendor,Centre,ED,ES\n0,AAA111,A,1,0,7\n")
    with pytest.raises(DataError, match="AAA111_sa"):
        load_mnms(root, info)


def test_mnms_info_missing_column(mnms_layout):
    root, info = mnms_layout
    info.write_text("External code,Vendor,ED\nAAA111,A,0\n")
    with pytest.raises(DataError, match=r"info.csv.*\['es'\]"):
        load_mnms(root, info)
