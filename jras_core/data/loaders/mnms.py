"""Reader of the official M&Ms layout: 4-D cine NIfTI volumes plus an info CSV."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from jras_core.data.loaders.common import (
    MAX_VOLUME_MIB,
    VolumeStream,
    _collect,
    _frame_index,
    _make_volume,
    _read_csv,
    _read_nifti,
    _spacing3,
)
from jras_core.data.volume import DataError, Volume

log = logging.getLogger(__name__)


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
    max_volume_mib: float | None = MAX_VOLUME_MIB,
    stream: bool = False,
) -> list[Volume] | VolumeStream:
    """Read the official M&Ms layout.

    ``root`` holds ``<code>/<code>_sa.nii.gz`` (4-D ``(H, W, Z, T)``) and
    ``<code>/<code>_sa_gt.nii.gz`` (possibly under split folders such as
    ``Training/Labeled``). The info CSV gives per case the vendor, centre and the
    0-based ED/ES frame indices (columns like ``External code, VendorName, Vendor,
    Centre, ED, ES``). Cases listed in the CSV but absent under ``root`` are
    ignored; cases without ground truth are skipped with a log message. A 4-D file whose
    header declares more than ``max_volume_mib`` MiB as read (float64) is refused before
    its data is read (``None``: no limit). With ``stream`` the result is a
    :class:`~jras_core.data.loaders.common.VolumeStream` that reads each case when iterated
    instead of a list of every volume.

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
        image4, zooms = _read_nifti(image_path, max_volume_mib)
        mask4, _ = _read_nifti(mask_path, max_volume_mib)
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

    return _collect(cases, read, skip_bad, stream=stream, what=str(root))
