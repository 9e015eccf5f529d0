"""Reader of the official ACDC layout of ``patientXXX`` folders."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from jras_core.data.loaders.common import MAX_VOLUME_MIB, VolumeStream, _collect, _frame_index, _read_nifti_pair
from jras_core.data.volume import DataError, Volume

ACDC_TO_MNMS: dict[int, int] = {0: 0, 1: 3, 2: 2, 3: 1}
"""ACDC labels (1 RV, 2 MYO, 3 LV) to the M&Ms convention (1 LV, 2 MYO, 3 RV)."""


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
    max_volume_mib: float | None = MAX_VOLUME_MIB,
    stream: bool = False,
) -> list[Volume] | VolumeStream:
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
        max_volume_mib: refuse a NIfTI file whose header declares more than this many MiB
            as read (float64), before reading its data (``None``: no limit).
        stream: return a :class:`~jras_core.data.loaders.common.VolumeStream` that reads
            each case when iterated instead of a list of every volume.

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
                    max_mib=max_volume_mib,
                    case=patient,
                    phase=phase.upper(),
                    vendor=vendor,
                    centre="",
                )
            )
        return out

    return _collect(infos, read, skip_bad, stream=stream, what=str(root))
