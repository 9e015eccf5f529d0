"""Tests of jras_core.data.loaders.manifest: manifest CSVs, row filters, the M&Ms sample."""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loader_cases import (
    HEADER,
    MNMS,
    group_manifest,
    needs_mnms,
    toy_pair,
    write_case,
    write_manifest,
)

from jras_core.data import ACDC_TO_MNMS, DataError, load_manifest, remap_labels


@needs_mnms
def test_mnms_sample_loads(mnms_volumes):
    assert len(mnms_volumes) == 12
    assert len({v.case for v in mnms_volumes}) == 6
    assert {v.vendor for v in mnms_volumes} == {"A", "B", "C"}
    assert {v.phase for v in mnms_volumes} == {"ED", "ES"}
    labels = set().union(*(np.unique(v.mask).tolist() for v in mnms_volumes))
    assert labels == {0, 1, 2, 3}
    for v in mnms_volumes:
        assert v.image.dtype == np.float32 and v.mask.dtype == np.int64
        assert v.image.ndim == 3 and v.image.shape == v.mask.shape
        zooms = nib.load(v.source).header.get_zooms()
        assert v.spacing == pytest.approx(tuple(float(z) for z in zooms[:3]))
        assert 1.1 <= v.spacing[0] <= 1.5 and 1.1 <= v.spacing[1] <= 1.5
        assert 5.0 <= v.spacing[2] <= 10.5


@pytest.mark.slow
@needs_mnms
def test_mnms_slice_counts_per_vendor(mnms_slices):
    assert Counter(mnms_slices.vendors) == {"A": 29, "B": 54, "C": 29}
    assert mnms_slices.images.shape[1:] == (1, 64, 64)


@needs_mnms
def test_manifest_vendor_filter():
    vols = load_manifest(MNMS / "manifest.csv", num_classes=4, vendors=["B"])
    assert len(vols) == 4 and {v.vendor for v in vols} == {"B"}
    with pytest.raises(DataError, match="vendor"):
        load_manifest(MNMS / "manifest.csv", num_classes=4, vendors=["Z"])


def test_absolute_paths_and_label_map(tmp_path):
    image, mask = toy_pair()
    case, img, msk = write_case(tmp_path, "abs", image, mask)
    path = write_manifest(tmp_path, [(case, str(tmp_path / img), str(tmp_path / msk))])
    (vol,) = load_manifest(path, num_classes=4, label_map=ACDC_TO_MNMS)
    np.testing.assert_array_equal(vol.mask, remap_labels(mask, ACDC_TO_MNMS))
    assert vol.centre == "1" and vol.key == "abs_ED"


@pytest.mark.parametrize(
    "text,problem",
    [
        ("", "empty"),
        (HEADER, "empty manifest"),
        ("case,phase,vendor,image\nx,ED,A,x.nii.gz\n", r"missing column\(s\) \['mask'\]"),
    ],
    ids=["blank", "header-only", "missing-column"],
)
def test_bad_manifest_raises_naming_file(tmp_path, text, problem):
    path = tmp_path / "broken_manifest.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=problem) as info:
        load_manifest(path, num_classes=4)
    assert "broken_manifest.csv" in str(info.value)


def test_missing_manifest(tmp_path):
    with pytest.raises(DataError, match="absent.csv"):
        load_manifest(tmp_path / "absent.csv", num_classes=4)


@pytest.mark.parametrize(
    "where,exclude,vendors,cases",
    [
        ({"group": "X"}, None, None, ["c1", "c2"]),
        ({"group": ["Y"]}, None, None, ["c3", "c4"]),
        ({"Group": ["X", "Y"]}, {"case": ["c2", "c3"]}, None, ["c1", "c4"]),
        (None, {"case": "c1"}, None, ["c2", "c3", "c4"]),
        ({"group": "Y"}, None, ["A"], ["c3"]),
        ({"case": ["c4", "c1"], "vendor": "B"}, None, None, ["c4"]),
        ({"centre": 1}, {"group": "X", "vendor": "B"}, None, ["c3"]),
    ],
)
def test_manifest_row_filters(tmp_path, where, exclude, vendors, cases):
    vols = load_manifest(
        group_manifest(tmp_path), num_classes=4, vendors=vendors, where=where, exclude=exclude
    )
    assert [v.case for v in vols] == cases


def test_manifest_extra_columns_are_kept_as_meta(tmp_path):
    vols = load_manifest(group_manifest(tmp_path), num_classes=4)
    assert [v.meta for v in vols] == [{"group": g} for g in "XXYY"]
    assert vols[0].centre == "1"
    path = write_manifest(tmp_path, [write_case(tmp_path, "plain", *toy_pair())])
    assert load_manifest(path, num_classes=4)[0].meta == {}


@pytest.mark.parametrize(
    "kwargs,problem",
    [
        ({"where": {"grp": "X"}}, r"where: unknown column 'grp'.*'group'"),
        ({"exclude": {"site": "c1"}}, "exclude: unknown column 'site'"),
        ({"where": {"group": ["X", "Z"]}}, r"where: group value\(s\) \['Z'\] appear in no row"),
        ({"exclude": {"case": "c9"}}, r"exclude: case value\(s\) \['c9'\] appear in no row"),
        ({"where": {"group": "X"}, "vendors": ["B"]}, "keep no row"),
        ({"where": {"group": "X"}, "exclude": {"case": ["c1", "c2"]}}, "keep no row"),
        ({"where": {"group": []}}, "keep no row"),
    ],
    ids=["where-column", "exclude-column", "where-value", "exclude-value", "vendor-and-where",
         "where-minus-exclude", "empty-list"],
)
def test_manifest_filter_errors_name_the_file(tmp_path, kwargs, problem):
    path = group_manifest(tmp_path)
    with pytest.raises(DataError, match=problem) as info:
        load_manifest(path, num_classes=4, **kwargs)
    assert str(path) in str(info.value)


def test_skip_bad_warns_and_keeps_good(tmp_path, caplog):
    image, mask = toy_pair()
    good = write_case(tmp_path, "good", image, mask)
    bad_mask = mask.copy()
    bad_mask[0, 0, 0] = 7
    bad = write_case(tmp_path, "bad", image, bad_mask)
    path = write_manifest(tmp_path, [good, bad])
    with pytest.raises(DataError, match="bad_gt.nii.gz"):
        load_manifest(path, num_classes=4)
    with caplog.at_level(logging.WARNING, logger="jras_core.data.loaders"):
        vols = load_manifest(path, num_classes=4, skip_bad=True)
    assert [v.case for v in vols] == ["good"]
    assert any(
        "bad_gt.nii.gz" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
    )


def test_skip_bad_with_nothing_left_raises(tmp_path):
    image, mask = toy_pair()
    image[0, 0, 0] = np.nan
    path = write_manifest(tmp_path, [write_case(tmp_path, "only", image, mask)])
    with pytest.raises(DataError, match="no usable case"):
        load_manifest(path, num_classes=4, skip_bad=True)


_csv_cell = st.one_of(
    st.sampled_from(["", "x.nii.gz", "/", ".", "manifest.csv", "ED", "A", "case", "mask"]),
    st.text(max_size=12),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.one_of(
        st.text(max_size=200),
        st.lists(st.lists(_csv_cell, max_size=7).map(",".join), max_size=5).map(
            lambda rows: "\n".join([HEADER.strip()] + rows)
        ),
    ),
    skip_bad=st.booleans(),
)
def test_manifest_parser_only_raises_data_error(text, skip_bad):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.csv"
        path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
        try:
            load_manifest(path, num_classes=4, skip_bad=skip_bad)
        except DataError:
            pass
