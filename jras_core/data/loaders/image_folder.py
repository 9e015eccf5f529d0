"""Reader of a folder of 2-D images with ``NAME_mask`` images (e.g. BUSI ultrasound)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from jras_core.data.loaders.common import (
    MAX_VOLUME_MIB,
    VolumeStream,
    _collect,
    _make_volume,
    _mask_int64,
    _one_line,
    check_volume_size,
    remap_labels,
)
from jras_core.data.volume import DataError, Volume

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""File types read by :func:`load_image_folder`."""


def _read_picture(path: Path, max_mib: float | None = MAX_VOLUME_MIB) -> np.ndarray:
    """A 2-D image file as an ``(H, W)`` or ``(H, W, channels)`` array; an image whose header
    declares more than ``max_mib`` MiB as read (float64) is refused before it is decoded."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            width, height = im.size
            check_volume_size(path, (height, width, len(im.getbands())), im.mode, max_mib)
            im.load()
            if im.mode == "P":
                im = im.convert("RGB")
            data = np.asarray(im)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError
        raise DataError(
            f"{path}: unreadable or truncated image ({_one_line(exc)}); re-export or replace it"
        ) from None
    if data.ndim not in (2, 3):
        raise DataError(f"{path}: expected a 2-D image, got shape {data.shape}")
    return data


def _gray(data: np.ndarray) -> np.ndarray:
    """``(H, W[, C])`` -> ``(H, W)`` float64 (colour channels averaged, alpha ignored)."""
    data = data.astype(np.float64)
    if data.ndim == 3:
        data = data[..., :3].mean(axis=-1) if data.shape[-1] >= 3 else data[..., 0]
    return data


def _picture_labels(
    data: np.ndarray, num_classes: int, label_map: Mapping[int, int] | None, path: Path
) -> np.ndarray:
    """Labels ``(H, W)`` int64 of a mask image.

    Colour masks take the channel maximum. Without ``label_map``, a mask whose
    values are only 0 and 255 (or booleans) is binary: 255 becomes label 1.
    """
    if data.ndim == 3:
        data = data[..., :3].max(axis=-1) if data.shape[-1] >= 3 else data[..., 0]
    mask = _mask_int64(np.asarray(data), path)
    if label_map:
        return remap_labels(mask, label_map)
    values = set(np.unique(mask).tolist())
    if values <= {0, 255} and num_classes <= 255:
        mask = (mask == 255).astype(np.int64)
    return mask


def _mask_files(name: str, suffix: str, files: Sequence[Path]) -> list[Path]:
    """Mask files of image ``name``: ``NAME<suffix>.*`` and ``NAME<suffix>_<n>.*``."""
    pattern = re.compile(rf"^{re.escape(name)}{re.escape(suffix)}(_\d+)?$")
    return sorted(p for p in files if pattern.match(p.stem))


def load_image_folder(
    root: str | Path,
    num_classes: int = 2,
    vendor: str = "",
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    label_map: Mapping[int, int] | None = None,
    skip_bad: bool = False,
    mask_suffix: str = "_mask",
    max_volume_mib: float | None = MAX_VOLUME_MIB,
    stream: bool = False,
) -> list[Volume] | VolumeStream:
    """Read a folder of 2-D ``NAME.png`` images with ``NAME_mask.png`` masks (e.g. BUSI).

    Images are converted to grayscale; colour masks take the channel maximum and
    0/255 masks become 0/1. Several masks ``NAME_mask.png``, ``NAME_mask_1.png``, ...
    are merged by union (label-wise maximum).

    Args:
        root: the folder (searched non-recursively).
        num_classes: number of classes including background.
        vendor: vendor label given to every volume.
        spacing: voxel size in mm.
        label_map: optional remap of the raw mask values.
        skip_bad: skip bad images with a warning instead of raising.
        mask_suffix: the suffix that marks a mask file.
        max_volume_mib: refuse an image whose header declares more than this many MiB as
            read (float64), before decoding it (``None``: no limit).
        stream: return a :class:`~jras_core.data.loaders.common.VolumeStream` that reads
            each image when iterated instead of a list of every volume.

    Returns:
        One :class:`Volume` per image, case ``NAME``, image ``(H, W, 1)`` float32,
        mask ``(H, W, 1)`` int64.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    is_mask = re.compile(rf"{re.escape(mask_suffix)}(_\d+)?$")
    images = [p for p in files if not is_mask.search(p.stem)]
    if not images:
        raise DataError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    sp = tuple(float(s) for s in spacing)

    def read(image_path: Path) -> list[Volume]:
        masks = _mask_files(image_path.stem, mask_suffix, files)
        if not masks:
            raise DataError(f"{image_path}: mask file {image_path.stem}{mask_suffix}.* not found")
        image = _gray(_read_picture(image_path, max_volume_mib))
        merged = None
        for mask_path in masks:
            labels = _picture_labels(_read_picture(mask_path, max_volume_mib), num_classes, label_map, mask_path)
            if labels.shape != image.shape:
                raise DataError(
                    f"{image_path}: image shape {image.shape} does not match mask shape "
                    f"{labels.shape} of {mask_path}"
                )
            merged = labels if merged is None else np.maximum(merged, labels)
        vol = _make_volume(
            image[:, :, None],
            merged[:, :, None],
            sp,
            image_path,
            masks[0],
            num_classes,
            None,
            case=image_path.stem,
            phase="",
            vendor=vendor,
            centre="",
        )
        return [vol]

    return _collect(images, read, skip_bad, stream=stream, what=str(root))
