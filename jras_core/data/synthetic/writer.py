"""Writing synthetic cases to disk: NIfTI image/mask files and a manifest CSV."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jras_core.data.loaders.manifest import MANIFEST_FIELDS
from jras_core.data.synthetic.generator import generate_volumes
from jras_core.data.synthetic.vendors import VendorSpec
from jras_core.files import atomic_write_text

log = logging.getLogger(__name__)

MANIFEST_HEADER: tuple[str, ...] = MANIFEST_FIELDS
"""The manifest's columns: those the manifest loader reads."""


def write_dataset(
    out_dir: str | Path,
    vendors: Sequence[str | VendorSpec],
    num_cases: int,
    seed: int,
    size: int = 128,
) -> Path:
    """Write synthetic cases of several vendors as NIfTI files plus a manifest.

    Files: ``<case>_<phase>.nii.gz`` (float32 image) and
    ``<case>_<phase>_gt.nii.gz`` (uint8 labels), affine ``diag(sx, sy, sz, 1)``;
    ``manifest.csv`` with header ``case,phase,vendor,centre,image,mask`` and
    paths relative to ``out_dir``, written atomically.

    Returns:
        The manifest path.
    """
    import nibabel as nib

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    for vendor in vendors:
        for vol in generate_volumes(vendor, num_cases, seed, size=size):
            affine = np.diag([*vol.spacing, 1.0])
            image_name = f"{vol.key}.nii.gz"
            mask_name = f"{vol.key}_gt.nii.gz"
            img = nib.Nifti1Image(vol.image.astype(np.float32), affine)
            img.header.set_zooms(vol.spacing)
            msk = nib.Nifti1Image(vol.mask.astype(np.uint8), affine)
            msk.header.set_zooms(vol.spacing)
            nib.save(img, out / image_name)
            nib.save(msk, out / mask_name)
            rows.append(
                {
                    "case": vol.case,
                    "phase": vol.phase,
                    "vendor": vol.vendor,
                    "centre": vol.centre,
                    "image": image_name,
                    "mask": mask_name,
                }
            )
    manifest = out / "manifest.csv"
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(MANIFEST_HEADER))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(manifest, text.getvalue())
    log.info("wrote %d synthetic volumes to %s", len(rows), out)
    return manifest
