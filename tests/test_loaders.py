"""Readers of real data: fixtures load, bad inputs fail clearly, layouts and remaps are right."""

from __future__ import annotations

import logging
import sys
import tempfile
import types
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from shared_data import SHARED, needs

from jras_core.config import ConfigError, PreprocessConfig
from jras_core.data import (
    ACDC_TO_MNMS,
    DataError,
    DataSourceConfig,
    build_slice_set,
    load_acdc,
    load_image_folder,
    load_manifest,
    load_mnms,
    load_volumes,
    remap_labels,
)

MNMS = SHARED / "mnms-sample"
BUSI = SHARED / "busi-sample"

needs_mnms = needs("mnms-sample")
needs_busi = pytest.mark.skipif(not BUSI.is_dir(), reason=f"BUSI fixture not found at {BUSI}")

HEADER = "case,phase,vendor,centre,image,mask\n"


# --------------------------------------------------------------------------- helpers


def save_nifti(path: Path, data: np.ndarray, spacing=(1.25, 1.25, 8.0)) -> Path:
    """Write ``data`` as NIfTI with the given voxel size (first three axes)."""
    affine = np.diag([*spacing, 1.0])
    nib.Nifti1Image(np.asarray(data), affine).to_filename(str(path))
    return path


def toy_pair(h: int = 12, w: int = 10, z: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A small image ``(H, W, Z)`` and a mask with labels 0..3."""
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, size=(h, w, z)).astype(np.float32)
    mask = np.zeros((h, w, z), dtype=np.uint8)
    mask[2:5, 2:5] = 1
    mask[5:7, 2:5] = 2
    mask[7:9, 2:5] = 3
    return image, mask


def write_manifest(folder: Path, rows: list[tuple[str, str, str]], header: str = HEADER) -> Path:
    """Manifest with rows ``(case, image file, mask file)``, vendor A, phase ED."""
    lines = [header] + [f"{case},ED,A,1,{img},{msk}\n" for case, img, msk in rows]
    path = folder / "manifest.csv"
    path.write_text("".join(lines))
    return path


def write_case(
    folder: Path, case: str, image: np.ndarray, mask: np.ndarray
) -> tuple[str, str, str]:
    save_nifti(folder / f"{case}.nii.gz", image)
    save_nifti(folder / f"{case}_gt.nii.gz", mask)
    return case, f"{case}.nii.gz", f"{case}_gt.nii.gz"


# --------------------------------------------------------------------------- real fixtures


@pytest.fixture(scope="module")
def mnms_volumes():
    if not (MNMS / "manifest.csv").is_file():
        pytest.skip(f"M&Ms fixture not found at {MNMS}")
    return load_manifest(MNMS / "manifest.csv", num_classes=4)


@pytest.fixture(scope="module")
def mnms_slices(mnms_volumes):
    return build_slice_set(mnms_volumes, PreprocessConfig(size=64), num_classes=4)


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


@needs_mnms
@pytest.mark.parametrize("val_fraction,seed", [(0.2, 0), (0.34, 1), (0.5, 2), (0.8, 3)])
def test_split_by_case_keeps_cases_whole(mnms_slices, val_fraction, seed):
    train, val = mnms_slices.split_by_case(val_fraction, seed)
    train_cases = {train.cases[i] for i in train.case_ids.tolist()}
    val_cases = {val.cases[i] for i in val.case_ids.tolist()}
    assert train_cases and val_cases
    assert not train_cases & val_cases
    assert len(train) + len(val) == len(mnms_slices)


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


# --------------------------------------------------------------------------- NIfTI variants


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


def test_absolute_paths_and_label_map(tmp_path):
    image, mask = toy_pair()
    case, img, msk = write_case(tmp_path, "abs", image, mask)
    path = write_manifest(tmp_path, [(case, str(tmp_path / img), str(tmp_path / msk))])
    (vol,) = load_manifest(path, num_classes=4, label_map=ACDC_TO_MNMS)
    np.testing.assert_array_equal(vol.mask, remap_labels(mask, ACDC_TO_MNMS))
    assert vol.centre == "1" and vol.key == "abs_ED"


# --------------------------------------------------------------------------- bad inputs


def _truncated(tmp_path):
    image, mask = toy_pair(64, 64, 8)
    row = write_case(tmp_path, "trunc", image, mask)
    data = (tmp_path / row[1]).read_bytes()
    (tmp_path / row[1]).write_bytes(data[: len(data) // 2])
    return [row], row[1]


def _shape_mismatch(tmp_path):
    image, mask = toy_pair()
    return [write_case(tmp_path, "shape", image, mask[:-1])], "shape.nii.gz"


def _label_seven(tmp_path):
    image, mask = toy_pair()
    mask[0, 0, 0] = 7
    return [write_case(tmp_path, "seven", image, mask)], "seven_gt.nii.gz"


def _nan_image(tmp_path):
    image, mask = toy_pair()
    image[1, 1, 1] = np.nan
    return [write_case(tmp_path, "nan", image, mask)], "nan.nii.gz"


def _fractional_mask(tmp_path):
    image, mask = toy_pair()
    frac = mask.astype(np.float32)
    frac[3, 3, 0] = 0.5
    return [write_case(tmp_path, "frac", image, frac)], "frac_gt.nii.gz"


def _missing_file(tmp_path):
    image, mask = toy_pair()
    case, img, _ = write_case(tmp_path, "lost", image, mask)
    return [(case, img, "nowhere_gt.nii.gz")], "nowhere_gt.nii.gz"


@pytest.mark.parametrize(
    "make,problem",
    [
        (_truncated, "truncated"),
        (_shape_mismatch, "does not match"),
        (_label_seven, r"labels \[7\]"),
        (_nan_image, "NaN"),
        (_fractional_mask, "non-integer"),
        (_missing_file, "not found"),
    ],
    ids=["truncated", "shape", "label7", "nan", "fractional", "missing"],
)
def test_bad_case_raises_naming_file(tmp_path, make, problem):
    rows, culprit = make(tmp_path)
    path = write_manifest(tmp_path, rows)
    with pytest.raises(DataError, match=problem) as info:
        load_manifest(path, num_classes=4)
    assert culprit in str(info.value)


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


GROUP_HEADER = "case,phase,vendor,centre,group,image,mask\n"


def group_manifest(folder: Path) -> Path:
    """Manifest of four one-volume cases: c1, c2 group X (vendor A), c3 group Y (vendor A),
    c4 group Y (vendor B); an extra ``group`` column."""
    image, mask = toy_pair()
    lines = [GROUP_HEADER]
    for case, group, vendor in [("c1", "X", "A"), ("c2", "X", "A"), ("c3", "Y", "A"), ("c4", "Y", "B")]:
        _, img, msk = write_case(folder, case, image, mask)
        lines.append(f"{case},ED,{vendor},1,{group},{img},{msk}\n")
    path = folder / "group_manifest.csv"
    path.write_text("".join(lines))
    return path


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


def test_site_yaml_filter_errors_name_yaml_and_manifest(tmp_path):
    from jras_core.site import SiteConfig

    manifest = group_manifest(tmp_path)
    site = tmp_path / "site.yaml"
    body = "name: s\ndata:\n  kind: manifest\n  path: group_manifest.csv\n  {}\n"
    site.write_text(body.format("where: {grp: X}"))
    with pytest.raises(ConfigError, match="unknown column 'grp'") as info:
        SiteConfig.from_yaml(site)
    assert str(site) in str(info.value) and str(manifest) in str(info.value)
    site.write_text(body.format("where: {group: X}\n  exclude: {case: [c1, c2]}"))
    with pytest.raises(ConfigError, match="keep no row") as info:
        SiteConfig.from_yaml(site)
    assert str(site) in str(info.value) and str(manifest) in str(info.value)
    site.write_text(body.format("where: {group: NO}"))
    with pytest.raises(ConfigError, match="YAML boolean"):
        SiteConfig.from_yaml(site)
    site.write_text(body.format("where: {group: Y}\n  vendor: A"))
    cfg = SiteConfig.from_yaml(site)
    assert [v.case for v in load_volumes(cfg.data, 4, tmp_path)] == ["c3"]


def test_row_filters_are_for_manifests_only(tmp_path):
    with pytest.raises(ConfigError, match="where.*kind 'synthetic'"):
        DataSourceConfig.from_dict({"kind": "synthetic", "vendor": "A", "where": {"case": "x"}})
    with pytest.raises(ConfigError, match="exclude.*kind 'folder'"):
        DataSourceConfig.from_dict({"kind": "folder", "path": str(tmp_path), "exclude": {"case": "x"}})
    for bad in ({}, ["group"], {"group": None}, {"group": [["X"]]}):
        with pytest.raises(ConfigError, match="where"):
            DataSourceConfig.from_dict({"kind": "manifest", "path": "x.csv", "where": bad})


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


# --------------------------------------------------------------------------- official M&Ms layout


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


# --------------------------------------------------------------------------- official ACDC layout


@pytest.fixture
def acdc_root(tmp_path):
    root = tmp_path / "ACDC" / "training"
    for pid, (ed, es) in {"patient001": (1, 3), "patient002": (1, 2)}.items():
        folder = root / pid
        folder.mkdir(parents=True)
        (folder / "Info.cfg").write_text(
            f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 180.0\nNbFrame: 4\n"
        )
        for frame in (ed, es):
            image, mask = toy_pair()
            mask[:] = 0
            mask[0:2] = 1  # ACDC RV
            mask[4:6] = 3  # ACDC LV
            save_nifti(folder / f"{pid}_frame{frame:02d}.nii.gz", image + frame)
            save_nifti(folder / f"{pid}_frame{frame:02d}_gt.nii.gz", mask)
    return tmp_path / "ACDC"


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


# --------------------------------------------------------------------------- 2-D image folders


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


# --------------------------------------------------------------------------- configured sources


def test_source_config_validation(tmp_path):
    with pytest.raises(ConfigError, match="needs 'path'"):
        DataSourceConfig.from_dict({"kind": "manifest"})
    with pytest.raises(ConfigError, match="does not exist"):
        DataSourceConfig.from_dict({"kind": "folder", "path": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="info_csv"):
        DataSourceConfig.from_dict({"kind": "mnms", "path": str(tmp_path)})
    with pytest.raises(ConfigError, match="vendor"):
        DataSourceConfig.from_dict({"kind": "synthetic"})
    with pytest.raises(ConfigError, match="kind"):
        DataSourceConfig.from_dict({"kind": "dicom", "path": str(tmp_path)})
    with pytest.raises(ConfigError, match="unknown key"):
        DataSourceConfig.from_dict({"kind": "synthetic", "vendor": "A", "colour": 1})
    with pytest.raises(ConfigError, match="label_map"):
        DataSourceConfig.from_dict({"kind": "synthetic", "vendor": "A", "label_map": {"x": 1}})
    cfg = DataSourceConfig.from_dict({"kind": "synthetic", "vendor": "A", "label_map": {"1": 3}})
    assert cfg.label_mapping() == {1: 3}


def test_load_volumes_dispatch(tmp_path, acdc_root):
    image, mask = toy_pair()
    (tmp_path / "site").mkdir()
    write_manifest(tmp_path / "site", [write_case(tmp_path / "site", "c1", image, mask)])
    src = DataSourceConfig(kind="manifest", path="site/manifest.csv")
    with pytest.raises(ConfigError):
        load_volumes(src, 4, root=tmp_path / "elsewhere")
    assert [v.case for v in load_volumes(src, 4, root=tmp_path)] == ["c1"]
    acdc = load_volumes(DataSourceConfig(kind="acdc", path=str(acdc_root), vendor="S"), 4)
    assert {v.vendor for v in acdc} == {"S"} and (acdc[0].mask[0:2] == 3).all()
    keep = load_volumes(DataSourceConfig(kind="acdc", path=str(acdc_root), label_map={}), 4)
    assert (keep[0].mask[0:2] == 1).all()


def test_load_volumes_synthetic_dispatch(monkeypatch):
    calls = []

    def generate_volumes(vendor, num_cases, seed, size=128, **_):
        calls.append((vendor, num_cases, seed, size))
        return []

    fake = types.ModuleType("jras_core.data.synthetic")
    fake.generate_volumes = generate_volumes
    monkeypatch.setitem(sys.modules, "jras_core.data.synthetic", fake)
    load_volumes(DataSourceConfig(kind="synthetic", vendor="B", cases=3, seed=7, size=64), 4)
    load_volumes(DataSourceConfig(kind="synthetic", vendor="B", vendor_spec={"noise": 0.1}), 4)
    assert calls == [("B", 3, 7, 64), ({"noise": 0.1}, 20, 0, 128)]


@needs_busi
def test_load_volumes_folder():
    vols = load_volumes(DataSourceConfig(kind="folder", path=str(BUSI), vendor="busi"), 2)
    assert len(vols) == 40 and vols[0].vendor == "busi"


# --------------------------------------------------------------------------- properties


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
