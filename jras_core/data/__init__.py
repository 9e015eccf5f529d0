"""Data: volumes, real-data readers, configured sources and preprocessed slice sets.

The synthetic generator (:mod:`jras_core.data.synthetic`) is imported on use only.
"""

from jras_core.data.loaders import (
    ACDC_TO_MNMS,
    MNMS_LABELS,
    load_acdc,
    load_image_folder,
    load_manifest,
    load_mnms,
    remap_labels,
)
from jras_core.data.slices import SliceSet, VolumeInfo, build_slice_set, preprocess_volume
from jras_core.data.sources import DataSourceConfig, load_volumes
from jras_core.data.volume import DataError, Volume

__all__ = [
    "ACDC_TO_MNMS",
    "MNMS_LABELS",
    "DataError",
    "DataSourceConfig",
    "SliceSet",
    "Volume",
    "VolumeInfo",
    "build_slice_set",
    "load_acdc",
    "load_image_folder",
    "load_manifest",
    "load_mnms",
    "load_volumes",
    "preprocess_volume",
    "remap_labels",
]
