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
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from jras_core.data.volume import DataError, Volume
from jras_core.files import resolve_path

log = logging.getLogger(__name__)

MNMS_LABELS: dict[int, str] = {0: "background", 1: "LV", 2: "MYO", 3: "RV"}
"""Label convention used throughout the project (M&Ms): 1 LV blood pool, 2 myocardium, 3 RV."""

ACDC_TO_MNMS: dict[int, int] = {0: 0, 1: 3, 2: 2, 3: 1}
"""ACDC labels (1 RV, 2 MYO, 3 LV) to the M&Ms convention (1 LV, 2 MYO, 3 RV)."""

MANIFEST_COLUMNS: tuple[str, ...] = ("case", "phase", "vendor", "image", "mask")
"""Columns a manifest CSV must have (``centre`` is optional)."""

MANIFEST_FIELDS: tuple[str, ...] = ("case", "phase", "vendor", "centre", "image", "mask")
"""Manifest columns read into :class:`Volume` fields; any other column goes to ``Volume.meta``."""

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""File types read by :func:`load_image_folder`."""

_T = TypeVar("_T")


# --------------------------------------------------------------------------- helpers


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


def _collect(
    items: Iterable[_T], read: Callable[[_T], list[Volume]], skip_bad: bool, what: str
) -> list[Volume]:
    """Read every item; on :class:`DataError` raise, or warn and skip when ``skip_bad``."""
    volumes: list[Volume] = []
    skipped = 0
    for item in items:
        try:
            volumes.extend(read(item))
        except DataError as exc:
            if not skip_bad:
                raise
            skipped += 1
            log.warning("skipping bad case: %s", exc)
    if not volumes:
        extra = f" ({skipped} bad case(s) skipped)" if skipped else ""
        raise DataError(f"{what}: no usable case{extra}")
    if skipped:
        log.warning("%s: %d bad case(s) skipped, %d volume(s) loaded", what, skipped, len(volumes))
    return volumes


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


def _read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Read a NIfTI file: (data as float64 array of its stored shape, header zooms)."""
    import nibabel as nib

    _require_file(path, "NIfTI")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float64))
        zooms = tuple(float(z) for z in img.header.get_zooms())
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types on corrupt files
        raise DataError(
            f"{path}: unreadable or truncated NIfTI file ({_one_line(exc)}); re-export or replace it"
        ) from None
    return data, zooms


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
    **meta: Any,
) -> Volume:
    """Read a 3-D NIfTI image and its mask (2-D becomes Z=1, a singleton 4th axis is dropped)."""
    image, zooms = _read_nifti(image_path)
    mask, _ = _read_nifti(mask_path)
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


# --------------------------------------------------------------------------- manifest


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
) -> list[Volume]:
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
        image_path = resolve_path(row["image"], [path.parent])
        mask_path = resolve_path(row["mask"], [path.parent])
        _require_file(image_path, f"image (manifest {path.name}, line {line})")
        _require_file(mask_path, f"mask (manifest {path.name}, line {line})")
        vol = _read_nifti_pair(
            image_path,
            mask_path,
            num_classes,
            label_map,
            case=row["case"],
            phase=row["phase"],
            vendor=row["vendor"],
            centre=row.get("centre", ""),
            meta={k: v for k, v in row.items() if k not in MANIFEST_FIELDS},
        )
        return [vol]

    return _collect(numbered, read, skip_bad, str(path))


# --------------------------------------------------------------------------- M&Ms official layout


_MNMS_ALIASES: dict[str, tuple[str, ...]] = {
    "code": ("externalcode", "code", "case", "subjectcode"),
    "vendor": ("vendor",),
    "centre": ("centre", "center"),
    "ed": ("ed",),
    "es": ("es",),
}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _mnms_columns(header: Sequence[str], path: Path) -> dict[str, str]:
    """Map logical names (code, vendor, centre, ed, es) to the info CSV's columns."""
    by_norm = {_norm(h): h for h in header if h}
    found: dict[str, str] = {}
    for key, aliases in _MNMS_ALIASES.items():
        for alias in aliases:
            if alias in by_norm:
                found[key] = by_norm[alias]
                break
    missing = [k for k in ("code", "vendor", "ed", "es") if k not in found]
    if missing:
        raise DataError(
            f"{path}: M&Ms info CSV is missing column(s) {missing} "
            f"(expected e.g. 'External code, Vendor, Centre, ED, ES'); "
            f"found {[h for h in header if h]}"
        )
    return found


def _frame_index(value: str, what: str, path: Path, code: str) -> int:
    try:
        number = float(value)
    except ValueError:
        raise DataError(f"{path}: case {code}: {what} frame {value!r} is not a number") from None
    if not number.is_integer() or number < 0:
        raise DataError(f"{path}: case {code}: {what} frame {value!r} is not a frame index")
    return int(number)


def _pick_frame(data: np.ndarray, frame: int, path: Path) -> np.ndarray:
    """Frame ``frame`` of a ``(H, W, Z, T)`` volume as ``(H, W, Z)``."""
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4:
        raise DataError(f"{path}: expected a 4-D (H, W, Z, T) cine volume, got shape {data.shape}")
    if not 0 <= frame < data.shape[3]:
        raise DataError(
            f"{path}: frame {frame} out of range, the volume has {data.shape[3]} frame(s)"
        )
    return data[..., frame]


def load_mnms(
    root: str | Path,
    info_csv: str | Path,
    num_classes: int = 4,
    label_map: Mapping[int, int] | None = None,
    skip_bad: bool = False,
    vendors: Sequence[str] | None = None,
    phases: Sequence[str] = ("ED", "ES"),
) -> list[Volume]:
    """Read the official M&Ms layout.

    ``root`` holds ``<code>/<code>_sa.nii.gz`` (4-D ``(H, W, Z, T)``) and
    ``<code>/<code>_sa_gt.nii.gz`` (possibly under split folders such as
    ``Training/Labeled``). The info CSV gives per case the vendor, centre and the
    0-based ED/ES frame indices (columns like ``External code, VendorName, Vendor,
    Centre, ED, ES``). Cases listed in the CSV but absent under ``root`` are
    ignored; cases without ground truth are skipped with a log message.

    Returns:
        One :class:`Volume` per case and phase, image/mask ``(H, W, Z)``.
    """
    root = Path(root)
    info_csv = Path(info_csv)
    if not root.is_dir():
        raise DataError(f"{root}: M&Ms root folder not found")
    for phase in phases:
        if phase.upper() not in ("ED", "ES"):
            raise DataError(f"{info_csv}: unknown phase {phase!r}; M&Ms gives ED and ES only")
    header, rows = _read_csv(info_csv)
    cols = _mnms_columns(header, info_csv)
    if not rows:
        raise DataError(f"{info_csv}: empty M&Ms info CSV (header but no rows)")
    images = {p.name[: -len("_sa.nii.gz")]: p for p in root.rglob("*_sa.nii.gz")}
    wanted = None if vendors is None else {str(v) for v in vendors}
    cases = []
    for row in rows:
        code = row[cols["code"]]
        if not code or (wanted is not None and row[cols["vendor"]] not in wanted):
            continue
        if code not in images:
            log.debug("%s: case %s not found under %s", info_csv, code, root)
            continue
        gt = images[code].with_name(f"{code}_sa_gt.nii.gz")
        if not gt.is_file():
            log.info("%s: no ground truth %s, case skipped", images[code], gt.name)
            continue
        cases.append((code, row, images[code], gt))
    if not cases:
        raise DataError(f"{root}: no labelled M&Ms case of {info_csv.name} found")

    def read(item: tuple[str, dict[str, str], Path, Path]) -> list[Volume]:
        code, row, image_path, mask_path = item
        frames = {p: _frame_index(row[cols[p.lower()]], p, info_csv, code) for p in phases}
        image4, zooms = _read_nifti(image_path)
        mask4, _ = _read_nifti(mask_path)
        spacing = _spacing3(zooms, image_path)
        out = []
        for phase, frame in frames.items():
            out.append(
                _make_volume(
                    _pick_frame(image4, frame, image_path),
                    _pick_frame(mask4, frame, mask_path),
                    spacing,
                    image_path,
                    mask_path,
                    num_classes,
                    label_map,
                    case=code,
                    phase=phase,
                    vendor=row[cols["vendor"]],
                    centre=row.get(cols.get("centre", ""), ""),
                )
            )
        return out

    return _collect(cases, read, skip_bad, str(root))


# --------------------------------------------------------------------------- ACDC official layout


def _read_info_cfg(path: Path) -> dict[str, str]:
    """``key: value`` lines of an ACDC ``Info.cfg``."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DataError(f"{path}: unreadable Info.cfg ({exc})") from None
    info = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip().upper()] = value.strip()
    return info


def load_acdc(
    root: str | Path,
    num_classes: int = 4,
    label_map: Mapping[int, int] | None = ACDC_TO_MNMS,
    skip_bad: bool = False,
    vendor: str = "ACDC",
    phases: Sequence[str] = ("ED", "ES"),
) -> list[Volume]:
    """Read the official ACDC layout.

    ``root`` holds ``patientXXX/Info.cfg`` (lines ``ED: 1``, ``ES: 12``, 1-based
    frame numbers) with ``patientXXX_frameNN.nii.gz`` and ``patientXXX_frameNN_gt.nii.gz``
    (possibly under ``training``/``testing`` folders). Masks are remapped from the
    ACDC labels (1 RV, 2 MYO, 3 LV) to the M&Ms convention by default.

    Args:
        root: dataset folder.
        num_classes: number of classes including background.
        label_map: label remap; ``None`` keeps the ACDC labels.
        skip_bad: skip bad cases with a warning instead of raising.
        vendor: vendor label given to every volume.
        phases: which of ``ED``/``ES`` to read.

    Returns:
        One :class:`Volume` per patient and phase, image/mask ``(H, W, Z)``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: ACDC root folder not found")
    infos = sorted(root.rglob("Info.cfg"))
    if not infos:
        raise DataError(f"{root}: no patientXXX/Info.cfg found")

    def read(info_path: Path) -> list[Volume]:
        info = _read_info_cfg(info_path)
        patient = info_path.parent.name
        out = []
        for phase in phases:
            value = info.get(phase.upper())
            if value is None:
                raise DataError(f"{info_path}: no '{phase.upper()}:' line")
            frame = _frame_index(value, phase, info_path, patient)
            stem = f"{patient}_frame{frame:02d}"
            image_path = info_path.parent / f"{stem}.nii.gz"
            mask_path = info_path.parent / f"{stem}_gt.nii.gz"
            out.append(
                _read_nifti_pair(
                    image_path,
                    mask_path,
                    num_classes,
                    label_map,
                    case=patient,
                    phase=phase.upper(),
                    vendor=vendor,
                    centre="",
                )
            )
        return out

    return _collect(infos, read, skip_bad, str(root))


# --------------------------------------------------------------------------- 2-D image folders


def _read_picture(path: Path) -> np.ndarray:
    """A 2-D image file as an ``(H, W)`` or ``(H, W, channels)`` array."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "P":
                im = im.convert("RGB")
            data = np.asarray(im)
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
) -> list[Volume]:
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
        image = _gray(_read_picture(image_path))
        merged = None
        for mask_path in masks:
            labels = _picture_labels(_read_picture(mask_path), num_classes, label_map, mask_path)
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

    return _collect(images, read, skip_bad, str(root))
