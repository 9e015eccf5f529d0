"""Readers of real segmentation data into :class:`~jras_core.data.volume.Volume` lists.

Supported sources:

* a manifest CSV of 3-D NIfTI image/mask pairs (:func:`load_manifest`);
* the official M&Ms layout of 4-D cine volumes plus an info CSV (:func:`load_mnms`);
* the official ACDC layout of ``patientXXX`` folders (:func:`load_acdc`);
* a folder of 2-D images with ``NAME_mask`` images, e.g. BUSI (:func:`load_image_folder`).

Every reader returns volumes whose image is ``(H, W, Z)`` float32 and whose mask
is ``(H, W, Z)`` int64, checked against the declared number of classes. Problems
raise :class:`DataError` with a message naming the file; with ``skip_bad=True`` a
bad case is logged as a warning and skipped instead.

One module per format (:mod:`~jras_core.data.loaders.manifest`,
:mod:`~jras_core.data.loaders.mnms`, :mod:`~jras_core.data.loaders.acdc`,
:mod:`~jras_core.data.loaders.image_folder`); what they share (label remapping,
file, CSV and NIfTI reading, checks) is in :mod:`~jras_core.data.loaders.common`.
"""

from jras_core.data.loaders.acdc import ACDC_TO_MNMS, load_acdc
from jras_core.data.loaders.common import MAX_VOLUME_MIB, MNMS_LABELS, check_volume_size, read_nifti_image, remap_labels
from jras_core.data.loaders.image_folder import IMAGE_SUFFIXES, load_image_folder
from jras_core.data.loaders.manifest import (
    MANIFEST_COLUMNS,
    MANIFEST_FIELDS,
    RowFilter,
    load_manifest,
    select_manifest_rows,
)
from jras_core.data.loaders.mnms import load_mnms

__all__ = [
    "ACDC_TO_MNMS",
    "IMAGE_SUFFIXES",
    "MANIFEST_COLUMNS",
    "MAX_VOLUME_MIB",
    "MANIFEST_FIELDS",
    "MNMS_LABELS",
    "RowFilter",
    "check_volume_size",
    "load_acdc",
    "load_image_folder",
    "load_manifest",
    "load_mnms",
    "read_nifti_image",
    "remap_labels",
    "select_manifest_rows",
]
