"""Small NIfTI cases and manifests written for the data readers' tests (good ones and one of
each kind of bad case), and where the real M&Ms and BUSI samples are."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from shared_data import SHARED, needs

MNMS = SHARED / "mnms-sample"

BUSI = SHARED / "busi-sample"

needs_mnms = needs("mnms-sample")

needs_busi = pytest.mark.skipif(not BUSI.is_dir(), reason=f"BUSI fixture not found at {BUSI}")

HEADER = "case,phase,vendor,centre,image,mask\n"


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


def header_only_nifti(path: Path, shape: tuple[int, ...], dtype=np.uint8) -> Path:
    """A NIfTI file of a header that declares ``shape`` voxels of ``dtype`` and no voxel data:
    gzipped (``.nii.gz``, a few dozen bytes) or plain (``.nii``, 352 bytes)."""
    import gzip

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    data = header.binaryblock + b"\0" * 4
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


# One bad case of each kind: each returns the manifest rows and the file the error must name.


def truncated_case(tmp_path):
    image, mask = toy_pair(64, 64, 8)
    row = write_case(tmp_path, "trunc", image, mask)
    data = (tmp_path / row[1]).read_bytes()
    (tmp_path / row[1]).write_bytes(data[: len(data) // 2])
    return [row], row[1]


def shape_mismatch_case(tmp_path):
    image, mask = toy_pair()
    return [write_case(tmp_path, "shape", image, mask[:-1])], "shape.nii.gz"


def label_seven_case(tmp_path):
    image, mask = toy_pair()
    mask[0, 0, 0] = 7
    return [write_case(tmp_path, "seven", image, mask)], "seven_gt.nii.gz"


def nan_image_case(tmp_path):
    image, mask = toy_pair()
    image[1, 1, 1] = np.nan
    return [write_case(tmp_path, "nan", image, mask)], "nan.nii.gz"


def fractional_mask_case(tmp_path):
    image, mask = toy_pair()
    frac = mask.astype(np.float32)
    frac[3, 3, 0] = 0.5
    return [write_case(tmp_path, "frac", image, frac)], "frac_gt.nii.gz"


def missing_file_case(tmp_path):
    image, mask = toy_pair()
    case, img, _ = write_case(tmp_path, "lost", image, mask)
    return [(case, img, "nowhere_gt.nii.gz")], "nowhere_gt.nii.gz"


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
