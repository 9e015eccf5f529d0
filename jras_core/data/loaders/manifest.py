"""Reader of a manifest CSV of 3-D NIfTI image/mask pairs, with row filters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jras_core.data.loaders.common import (
    MAX_VOLUME_MIB,
    VolumeStream,
    _collect,
    _read_csv,
    _read_nifti_pair,
    _require_file,
)
from jras_core.data.volume import DataError, Volume
from jras_core.files import resolve_path

MANIFEST_COLUMNS: tuple[str, ...] = ("case", "phase", "vendor", "image", "mask")
"""Columns a manifest CSV must have (``centre`` is optional)."""

MANIFEST_FIELDS: tuple[str, ...] = ("case", "phase", "vendor", "centre", "image", "mask")
"""Manifest columns read into :class:`Volume` fields; any other column goes to ``Volume.meta``."""


RowFilter = Mapping[str, Any]
"""A manifest row filter: ``{column: value or list of values}``."""


def _filter_values(value: Any) -> set[str]:
    """The values of one filter entry as strings (a scalar is a one-value list)."""
    if isinstance(value, (list, tuple, set, frozenset)):
        return {str(v).strip() for v in value}
    return {str(value).strip()}


def _describe_filters(
    vendors: Sequence[str] | None, where: RowFilter | None, exclude: RowFilter | None
) -> str:
    parts = []
    if vendors is not None:
        parts.append(f"vendor in {sorted(str(v) for v in vendors)}")
    for name, spec, op in (("where", where, "in"), ("exclude", exclude, "not in")):
        for column, value in (spec or {}).items():
            parts.append(f"{name}: {column} {op} {sorted(_filter_values(value))}")
    return "; ".join(parts) or "no filter"


def select_manifest_rows(
    path: str | Path,
    vendors: Sequence[str] | None = None,
    where: RowFilter | None = None,
    exclude: RowFilter | None = None,
) -> list[tuple[int, dict[str, str]]]:
    """The rows of a manifest CSV that its filters keep, without reading any image.

    Filters combine with AND: ``vendors`` keeps rows whose ``vendor`` is listed;
    every ``where`` entry ``{column: values}`` keeps rows whose value in that column
    is one of ``values`` (a scalar is a one-value list); every ``exclude`` entry
    drops the rows whose value is one of its values. Column names are
    case-insensitive, values are compared as strings, exactly.

    Args:
        path: the manifest CSV.
        vendors: vendor filter (``None``: every vendor).
        where: ``{column: value or [values]}`` rows to keep.
        exclude: ``{column: value or [values]}`` rows to drop.

    Returns:
        ``(line number in the CSV, row)`` pairs; a row maps lower-cased column names
        to stripped values.

    Raises:
        DataError: naming the file, for a missing required column, an empty manifest,
            a filter on a column the manifest does not have, a filter value that no
            row holds, or filters that keep no row.
    """
    path = Path(path)
    header, rows = _read_csv(path)
    missing = [c for c in MANIFEST_COLUMNS if c not in header]
    if missing:
        raise DataError(
            f"{path}: manifest is missing column(s) {missing}; found {[h for h in header if h]}"
        )
    if not rows:
        raise DataError(f"{path}: empty manifest (header but no rows)")
    numbered = list(enumerate(rows, start=2))
    if vendors is not None:
        wanted = {str(v) for v in vendors}
        numbered = [(n, r) for n, r in numbered if r["vendor"] in wanted]
        if not numbered:
            raise DataError(f"{path}: no row has a vendor in {sorted(wanted)}")
    columns = [h for h in header if h]
    for name, spec, keep in (("where", where, True), ("exclude", exclude, False)):
        for column, value in (spec or {}).items():
            col = str(column).strip().lower()
            if col not in columns:
                raise DataError(
                    f"{path}: {name}: unknown column {str(column)!r}; the manifest has {columns}"
                )
            values = _filter_values(value)
            absent = sorted(values - {r[col] for r in rows})
            if absent:
                raise DataError(
                    f"{path}: {name}: {col} value(s) {absent} appear in no row of the manifest"
                )
            numbered = [(n, r) for n, r in numbered if (r[col] in values) == keep]
    if not numbered:
        raise DataError(
            f"{path}: the filters keep no row ({_describe_filters(vendors, where, exclude)})"
        )
    return numbered


def load_manifest(
    path: str | Path,
    num_classes: int,
    label_map: Mapping[int, int] | None = None,
    skip_bad: bool = False,
    vendors: Sequence[str] | None = None,
    where: RowFilter | None = None,
    exclude: RowFilter | None = None,
    max_volume_mib: float | None = MAX_VOLUME_MIB,
    stream: bool = False,
) -> list[Volume] | VolumeStream:
    """Read the volumes listed in a manifest CSV.

    The CSV has a header with at least ``case, phase, vendor, image, mask``
    (``centre`` optional). ``image``/``mask`` are NIfTI paths, relative to the
    CSV's folder or absolute. Any other column (e.g. ACDC's ``group``) is kept in
    each volume's ``meta`` and can be filtered on.

    Args:
        path: the manifest CSV.
        num_classes: number of classes including background.
        label_map: optional ``{old: new}`` label remap applied to every mask.
        skip_bad: skip bad rows/cases with a warning instead of raising.
        vendors: keep only rows whose ``vendor`` is listed.
        where: ``{column: value or [values]}``: keep only rows whose value is listed
            (see :func:`select_manifest_rows`).
        exclude: ``{column: value or [values]}``: drop the rows whose value is listed.
        max_volume_mib: refuse a NIfTI file whose header declares more than this many MiB
            as read (float64), before reading its data (``None``: no limit).
        stream: return a :class:`~jras_core.data.loaders.common.VolumeStream` that reads
            each case when iterated instead of a list of every volume.

    Returns:
        One :class:`Volume` per kept row, image ``(H, W, Z)`` float32, mask ``(H, W, Z)``
        int64, spacing from the image header.
    """
    path = Path(path)
    numbered = select_manifest_rows(path, vendors=vendors, where=where, exclude=exclude)

    def read(item: tuple[int, dict[str, str]]) -> list[Volume]:
        line, row = item
        for col in ("case", "image", "mask"):
            if not row[col]:
                raise DataError(f"{path}: line {line}: empty '{col}' value")
            if "\x00" in row[col]:
                raise DataError(f"{path}: line {line}: '{col}' value holds a NUL character")
        image_path = resolve_path(row["image"], [path.parent])
        mask_path = resolve_path(row["mask"], [path.parent])
        _require_file(image_path, f"image (manifest {path.name}, line {line})")
        _require_file(mask_path, f"mask (manifest {path.name}, line {line})")
        vol = _read_nifti_pair(
            image_path,
            mask_path,
            num_classes,
            label_map,
            max_mib=max_volume_mib,
            case=row["case"],
            phase=row["phase"],
            vendor=row["vendor"],
            centre=row.get("centre", ""),
            meta={k: v for k, v in row.items() if k not in MANIFEST_FIELDS},
        )
        return [vol]

    return _collect(numbered, read, skip_bad, stream=stream, what=str(path))
