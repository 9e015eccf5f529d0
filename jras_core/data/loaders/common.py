"""What the data readers share: the project's label convention and label remapping,
tolerant reading of many cases, file, CSV and NIfTI reading, and the checks that
turn an image/mask pair into a :class:`~jras_core.data.volume.Volume`.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from jras_core.data.volume import DataError, Volume

log = logging.getLogger(__name__)

MNMS_LABELS: dict[int, str] = {0: "background", 1: "LV", 2: "MYO", 3: "RV"}
"""Label convention used throughout the project (M&Ms): 1 LV blood pool, 2 myocardium, 3 RV."""

MAX_VOLUME_MIB = 512
"""Default limit on one volume's size in memory as read (float64 voxels), MiB; a file whose
header declares more is refused before its data is read."""

_T = TypeVar("_T")


def remap_labels(mask: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    """Replace label values by ``mapping``; values not in the mapping are kept.

    All replacements are made from the original values at once, so swaps such as
    ``{1: 3, 3: 1}`` work.

    Args:
        mask: integer label array of any shape.
        mapping: ``{old_label: new_label}``.

    Returns:
        An int64 array of the same shape.
    """
    mask = np.asarray(mask)
    out = mask.astype(np.int64, copy=True)
    for old, new in mapping.items():
        out[mask == int(old)] = int(new)
    return out


class VolumeStream:
    """The volumes of a reader, read one item (case or file) at a time as they are iterated,
    so that a site can preprocess each volume and let it go before the next is read (the
    whole data set never sits in memory at its native resolution).

    Each iteration reads the files anew. On :class:`DataError` an item raises, or with
    ``skip_bad`` is logged and skipped; an iteration that yields no volume raises
    :class:`DataError` at its end.

    Args:
        items: what ``read`` takes, one case or file each (listed up front, nothing read yet).
        read: reads one item into its volumes.
        skip_bad: skip a bad item with a warning instead of raising.
        what: the source, for messages.
    """

    def __init__(self, items: Iterable[_T], read: Callable[[_T], list[Volume]], skip_bad: bool, what: str):
        self.items = list(items)
        self.read = read
        self.skip_bad = skip_bad
        self.what = what

    def __iter__(self) -> Iterator[Volume]:
        count = skipped = 0
        for item in self.items:
            try:
                volumes = self.read(item)
            except DataError as exc:
                if not self.skip_bad:
                    raise
                skipped += 1
                log.warning("skipping bad case: %s", exc)
                continue
            count += len(volumes)
            yield from volumes
        if not count:
            extra = f" ({skipped} bad case(s) skipped)" if skipped else ""
            raise DataError(f"{self.what}: no usable case{extra}")
        if skipped:
            log.warning("%s: %d bad case(s) skipped, %d volume(s) loaded", self.what, skipped, count)


def _collect(
    items: Iterable[_T], read: Callable[[_T], list[Volume]], skip_bad: bool, *, what: str, stream: bool = False
) -> list[Volume] | VolumeStream:
    """Every item's volumes (:class:`VolumeStream`), read now into a list, or with ``stream``
    the stream itself, read as it is iterated."""
    volumes = VolumeStream(items, read, skip_bad, what)
    return volumes if stream else list(volumes)


def _one_line(exc: BaseException) -> str:
    """``Type: message`` of a third-party exception, on one line."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _require_file(path: Path, what: str) -> None:
    try:
        ok = path.is_file()
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise DataError(f"{path}: {what} file not found")


def _size(nbytes: float) -> str:
    """``nbytes`` in GiB from 1 GiB on, else in MiB."""
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def check_volume_size(path: Path, shape: Sequence[int], dtype: Any, max_mib: float | None) -> None:
    """Refuse a volume whose declared ``shape`` is over ``max_mib`` MiB when read as float64.

    Called with the header's shape before any voxel is read, so a small file that declares
    a huge volume (a compressed or sparse file) costs no memory.

    Raises:
        DataError: naming the file, its declared shape and dtype, its size as read and the limit.
    """
    if max_mib is None:
        return
    voxels = math.prod(int(d) for d in shape)
    nbytes = voxels * 8  # read as float64
    if nbytes > max_mib * 2**20:
        dims = " x ".join(str(int(d)) for d in shape)
        raise DataError(
            f"{path}: header declares {dims} voxels of {dtype} ({_size(nbytes)} when read), over the "
            f"limit of {_size(max_mib * 2**20)} per volume; if the volume is genuine, raise "
            f"data.max_volume_mib in the site YAML"
        )


def _load_nifti(path: Path, max_mib: float | None = MAX_VOLUME_MIB) -> tuple[Any, np.ndarray, tuple[float, ...]]:
    """Read a NIfTI file: (the nibabel image, its data as a float64 array of the stored shape,
    the header zooms).

    The header is read first and a volume over ``max_mib`` MiB (as float64) is refused
    (:func:`check_volume_size`) before any voxel data is read or allocated.
    """
    import nibabel as nib

    _require_file(path, "NIfTI")
    try:
        img = nib.load(str(path))  # the header only: nibabel reads voxel data lazily
        shape, dtype = tuple(img.shape), img.header.get_data_dtype()
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types on corrupt files
        raise DataError(
            f"{path}: unreadable or truncated NIfTI header ({_one_line(exc)}); re-export or replace it"
        ) from None
    check_volume_size(path, shape, dtype, max_mib)
    try:
        data = np.asarray(img.get_fdata(dtype=np.float64))
        zooms = tuple(float(z) for z in img.header.get_zooms())
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types on corrupt files
        raise DataError(
            f"{path}: unreadable or truncated NIfTI file ({_one_line(exc)}); re-export or replace it"
        ) from None
    return img, data, zooms


def _read_nifti(path: Path, max_mib: float | None = MAX_VOLUME_MIB) -> tuple[np.ndarray, tuple[float, ...]]:
    """Read a NIfTI file: (data as float64 array of its stored shape, header zooms); see
    :func:`_load_nifti`."""
    _, data, zooms = _load_nifti(path, max_mib)
    return data, zooms


def read_nifti_image(path: str | Path, max_mib: float | None = MAX_VOLUME_MIB) -> tuple[np.ndarray, tuple[float, float, float], Any]:
    """Read an unlabelled image as the readers read a labelled one.

    A 2-D image becomes one slice and a singleton fourth axis is dropped; a 4-D series
    (e.g. a whole cine) is an error, as are NaN or infinite intensities and invalid spacing,
    and so is a volume over ``max_mib`` MiB as float64 (refused from its header).

    Returns:
        image ``(H, W, Z)`` float32, spacing ``(sx, sy, sz)`` in mm from the header, and the
        nibabel image (its ``shape``, ``affine`` and ``header`` describe the file's grid).

    Raises:
        DataError: naming the file and the problem.
    """
    path = Path(path)
    img, data, zooms = _load_nifti(path, max_mib)
    image = _image_float32(_as_3d(data, path), path)
    return image, _spacing3(zooms, path), img


def _as_3d(data: np.ndarray, path: Path) -> np.ndarray:
    """``(H, W)`` -> ``(H, W, 1)``; ``(H, W, Z, 1)`` -> ``(H, W, Z)``; ``(H, W, Z)`` kept."""
    if data.ndim == 2:
        return data[:, :, None]
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 2-D or 3-D volume, got shape {data.shape}")
    return data


def _spacing3(zooms: Sequence[float], path: Path) -> tuple[float, float, float]:
    """First three header zooms (a missing third one is 1 mm)."""
    z = [float(v) for v in zooms[:3]] + [1.0] * max(0, 3 - len(zooms))
    if any(not np.isfinite(v) or v <= 0 for v in z):
        raise DataError(f"{path}: invalid voxel spacing {tuple(z)} in the header")
    return z[0], z[1], z[2]


def _image_float32(data: np.ndarray, path: Path) -> np.ndarray:
    """Float32 intensities; NaN or infinite values are an error."""
    if not np.all(np.isfinite(data)):
        raise DataError(f"{path}: image contains NaN or infinite intensities")
    return data.astype(np.float32)


def _mask_int64(data: np.ndarray, path: Path) -> np.ndarray:
    """Round a mask stored as floats to int64; non-integer values are an error."""
    if data.dtype.kind in "iub":
        return data.astype(np.int64)
    if not np.all(np.isfinite(data)):
        raise DataError(f"{path}: mask contains NaN or infinite values")
    rounded = np.rint(data)
    off = np.abs(data - rounded) > 1e-3
    if np.any(off):
        raise DataError(f"{path}: mask has non-integer values, e.g. {float(data[off].flat[0])!r}")
    return rounded.astype(np.int64)


def _check_labels(mask: np.ndarray, num_classes: int, path: Path) -> None:
    labels = np.unique(mask)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise DataError(
            f"{path}: mask labels {bad.tolist()} outside the declared set 0..{num_classes - 1}"
        )


def _make_volume(
    image: np.ndarray,
    mask: np.ndarray,
    spacing: tuple[float, float, float],
    image_path: Path,
    mask_path: Path,
    num_classes: int,
    label_map: Mapping[int, int] | None,
    **meta: Any,
) -> Volume:
    """Check one image/mask pair and wrap it as a :class:`Volume`.

    Args:
        image: ``(H, W, Z)`` intensities (any float dtype).
        mask: ``(H, W, Z)`` labels (integer-valued, any dtype).
        spacing: voxel size in mm.
        image_path, mask_path: files the arrays came from (for messages).
        num_classes: number of classes including background.
        label_map: optional ``{old: new}`` applied to the mask before the label check.
        **meta: ``case``, ``phase``, ``vendor``, ``centre`` and optionally ``meta`` (a dict).
    """
    if image.shape != mask.shape:
        raise DataError(
            f"{image_path}: image shape {image.shape} does not match mask shape "
            f"{mask.shape} of {mask_path}"
        )
    image = _image_float32(image, image_path)
    mask = _mask_int64(mask, mask_path)
    if label_map:
        mask = remap_labels(mask, label_map)
    _check_labels(mask, num_classes, mask_path)
    vol = Volume(image=image, mask=mask, spacing=spacing, source=str(image_path), **meta)
    vol.check(num_classes)
    return vol


def _read_nifti_pair(
    image_path: Path,
    mask_path: Path,
    num_classes: int,
    label_map: Mapping[int, int] | None,
    *,
    max_mib: float | None = MAX_VOLUME_MIB,
    **meta: Any,
) -> Volume:
    """Read a 3-D NIfTI image and its mask (2-D becomes Z=1, a singleton 4th axis is dropped);
    either file over ``max_mib`` MiB as read is refused before its data is read."""
    image, zooms = _read_nifti(image_path, max_mib)
    mask, _ = _read_nifti(mask_path, max_mib)
    image = _as_3d(image, image_path)
    mask = _as_3d(mask, mask_path)
    spacing = _spacing3(zooms, image_path)
    return _make_volume(image, mask, spacing, image_path, mask_path, num_classes, label_map, **meta)


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Rows of a CSV file as dicts keyed by stripped, lower-cased column names."""
    _require_file(path, "CSV")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            rows = [row for row in reader]
    except (csv.Error, UnicodeDecodeError, OSError) as exc:
        raise DataError(f"{path}: malformed CSV ({type(exc).__name__}: {exc})") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise DataError(f"{path}: empty CSV (no header)")
    header = [h.strip().lower() for h in rows[0]]
    records = []
    for row in rows[1:]:
        rec = {
            name: (row[i].strip() if i < len(row) else "") for i, name in enumerate(header) if name
        }
        records.append(rec)
    return header, records


def _frame_index(value: str, what: str, path: Path, code: str) -> int:
    try:
        number = float(value)
    except ValueError:
        raise DataError(f"{path}: case {code}: {what} frame {value!r} is not a number") from None
    if not number.is_integer() or number < 0:
        raise DataError(f"{path}: case {code}: {what} frame {value!r} is not a frame index")
    return int(number)
