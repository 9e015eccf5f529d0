"""The in-memory unit every data source produces: one annotated image volume."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class DataError(ValueError):
    """Bad input data; the message names the file and the problem."""


@dataclass
class Volume:
    """One annotated case-phase (or one 2-D image, stored with one slice).

    Attributes:
        image: ``(H, W, Z)`` float32 intensities (Z=1 for 2-D images).
        mask: ``(H, W, Z)`` int64 labels in ``0..C-1`` of the dataset's label set.
        spacing: ``(sx, sy, sz)`` voxel size in mm.
        case: patient / subject id; slices of one case are never split across
            train and validation and never retrieve each other.
        phase: cardiac phase (``ED``/``ES``) or ``""``.
        vendor: scanner vendor (``A``..``D``) or ``""``.
        centre: acquiring centre or ``""``.
        source: the file the volume came from (for error messages).
        meta: further descriptors of the case from its source, e.g. a manifest's extra
            columns (``{"group": "DCM", "frame": "1"}``); empty when the source has none.
    """

    image: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, float, float]
    case: str
    phase: str = ""
    vendor: str = ""
    centre: str = ""
    source: str = ""
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Unique id of the volume: ``case`` or ``case_phase``."""
        return f"{self.case}_{self.phase}" if self.phase else self.case

    def check(self, num_classes: int) -> None:
        """Raise :class:`DataError` if the volume is inconsistent."""
        where = self.source or self.key
        if self.image.ndim != 3:
            raise DataError(f"{where}: image must be 3-D (H, W, Z), got shape {self.image.shape}")
        if self.image.shape != self.mask.shape:
            raise DataError(
                f"{where}: image shape {self.image.shape} does not match mask shape {self.mask.shape}"
            )
        if not np.all(np.isfinite(self.image)):
            raise DataError(f"{where}: image contains NaN or infinite intensities")
        labels = np.unique(self.mask)
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.size:
            raise DataError(
                f"{where}: mask labels {bad.tolist()} outside the declared set 0..{num_classes - 1}"
            )
        if len(self.spacing) != 3 or any(not np.isfinite(s) or s <= 0 for s in self.spacing):
            raise DataError(f"{where}: invalid voxel spacing {self.spacing}")
