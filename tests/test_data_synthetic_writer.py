"""Tests of jras_core.data.synthetic.writer: a synthetic dataset as NIfTI files and a manifest."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest

from jras_core.data.synthetic import MANIFEST_HEADER, generate_volumes, write_dataset


def test_write_dataset_round_trip(tmp_path):
    out = tmp_path / "syn"
    manifest = write_dataset(out, ["A", "D"], num_cases=1, seed=9, size=32)
    assert manifest == out / "manifest.csv"
    with open(manifest, newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == MANIFEST_HEADER
        rows = list(reader)
    assert [(r["case"], r["phase"], r["vendor"]) for r in rows] == [
        ("synA000", "ED", "A"),
        ("synA000", "ES", "A"),
        ("synD000", "ED", "D"),
        ("synD000", "ES", "D"),
    ]
    expected = generate_volumes("A", 1, 9, size=32) + generate_volumes("D", 1, 9, size=32)
    for row, vol in zip(rows, expected):
        assert row["image"] == f"{vol.key}.nii.gz" and row["mask"] == f"{vol.key}_gt.nii.gz"
        img = nib.load(out / row["image"])
        msk = nib.load(out / row["mask"])
        assert img.header.get_zooms()[:3] == pytest.approx(vol.spacing)
        assert np.diag(img.affine)[:3] == pytest.approx(vol.spacing)
        np.testing.assert_array_equal(np.asarray(img.dataobj), vol.image)
        np.testing.assert_array_equal(np.asarray(msk.dataobj).astype(np.int64), vol.mask)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_written_manifest_loads_with_the_manifest_reader(tmp_path):
    from jras_core.data.loaders import load_manifest

    manifest = write_dataset(tmp_path, ["C"], num_cases=1, seed=0, size=32)
    vols = load_manifest(manifest, num_classes=4)
    assert [(v.case, v.phase, v.vendor) for v in vols] == [
        ("synC000", "ED", "C"),
        ("synC000", "ES", "C"),
    ]
    assert vols[0].spacing == pytest.approx((360.0 / 32, 360.0 / 32, 10.0))
