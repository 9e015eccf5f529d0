"""Preprocessed 2-D slices held in memory as tensors.

A :class:`SliceSet` is what training, retrieval banks and evaluation consume:
every slice resampled in-plane, cropped/padded to a fixed size and
intensity-normalised (MONAI transforms), with the case and volume each slice
came from so that splits, retrieval exclusion and volume metrics stay correct.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.transforms import Resize, ResizeWithPadOrCrop, ScaleIntensityRangePercentiles

from jras_core.config import PreprocessConfig
from jras_core.data.volume import DataError, Volume

log = logging.getLogger(__name__)


@dataclass
class VolumeInfo:
    """Metadata of one volume inside a :class:`SliceSet`."""

    key: str
    case: str
    phase: str
    vendor: str
    centre: str
    spacing: tuple[float, float, float]
    """Voxel size after preprocessing, mm."""
    source: str = ""


@dataclass
class SliceSet:
    """Fixed-size 2-D slices of one or more volumes.

    Attributes:
        images: ``(N, 1, S, S)`` float32, intensities normalised to about ``[0, 1]``.
        masks: ``(N, S, S)`` uint8 labels ``0..C-1``.
        case_ids: ``(N,)`` int64, index into :attr:`cases` (patient id; retrieval never
            returns a slice of the query's own case).
        volume_ids: ``(N,)`` int64, index into :attr:`volumes`.
        slice_pos: ``(N,)`` int64, slice index inside its volume.
        cases: case names.
        volumes: per-volume metadata (spacing for HD95, vendor, source file).
    """

    images: torch.Tensor
    masks: torch.Tensor
    case_ids: torch.Tensor
    volume_ids: torch.Tensor
    slice_pos: torch.Tensor
    cases: list[str] = field(default_factory=list)
    volumes: list[VolumeInfo] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def vendors(self) -> list[str]:
        """Vendor of every slice."""
        return [self.volumes[v].vendor for v in self.volume_ids.tolist()]

    def volume_rows(self) -> list[tuple[int, torch.Tensor]]:
        """Each volume present, in order of first appearance, with the indices of its
        slices sorted by position: ``[(volume_id, (Z,) int64), ...]``."""
        groups: dict[int, list[int]] = {}
        for i, v in enumerate(self.volume_ids.tolist()):
            groups.setdefault(v, []).append(i)
        pos = self.slice_pos.tolist()
        return [(v, torch.tensor(sorted(rows, key=lambda r: pos[r]), dtype=torch.long)) for v, rows in groups.items()]

    def subset(self, index: Sequence[int] | torch.Tensor) -> SliceSet:
        """The slices at ``index`` (case and volume tables are kept whole)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return SliceSet(
            images=self.images[idx],
            masks=self.masks[idx],
            case_ids=self.case_ids[idx],
            volume_ids=self.volume_ids[idx],
            slice_pos=self.slice_pos[idx],
            cases=list(self.cases),
            volumes=list(self.volumes),
        )

    def select_cases(self, names: Iterable[str]) -> SliceSet:
        """The slices of the named cases."""
        wanted = {self.cases.index(n) for n in names}
        mask = torch.tensor([c in wanted for c in self.case_ids.tolist()], dtype=torch.bool)
        return self.subset(torch.nonzero(mask).flatten())

    def rows(self, start: int, stop: int) -> SliceSet:
        """Slices ``start:stop`` as views of this set's tensors (no copy; case and volume
        tables kept whole)."""
        return SliceSet(
            images=self.images[start:stop],
            masks=self.masks[start:stop],
            case_ids=self.case_ids[start:stop],
            volume_ids=self.volume_ids[start:stop],
            slice_pos=self.slice_pos[start:stop],
            cases=list(self.cases),
            volumes=list(self.volumes),
        )

    def partition(self, cases: set[int]) -> tuple[SliceSet, SliceSet, SliceSet]:
        """Part the slices by case: ``(whole, rest, chosen)``. ``whole`` is one copy of the set
        with the slices of cases not in ``cases`` (indices into :attr:`cases`) first and
        those of ``cases`` after them, each group in its order here; ``rest`` and ``chosen``
        are views of its two groups, so the two parts take the memory of one set."""
        is_chosen = torch.tensor([c in cases for c in self.case_ids.tolist()], dtype=torch.bool)
        order = torch.cat([torch.nonzero(~is_chosen).flatten(), torch.nonzero(is_chosen).flatten()])
        whole = self.subset(order)
        n_rest = int((~is_chosen).sum())
        return whole, whole.rows(0, n_rest), whole.rows(n_rest, len(whole))

    def validation_cases(self, val_fraction: float, seed: int) -> set[int]:
        """The cases (indices into :attr:`cases`) that a split by case with ``val_fraction``
        holds out: at least one and not all when ``val_fraction > 0`` and two or more
        cases are present."""
        present = sorted(set(self.case_ids.tolist()))
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(present))
        n_val = int(round(val_fraction * len(present)))
        if val_fraction > 0 and len(present) > 1:
            n_val = min(max(n_val, 1), len(present) - 1)
        return {present[i] for i in order[:n_val]}

    def random_cases(self, n: int, seed: int) -> set[int]:
        """``n`` randomly chosen cases present (indices into :attr:`cases`)."""
        present = sorted(set(self.case_ids.tolist()))
        if n >= len(present):
            raise DataError(f"asked for {n} support cases but the set has only {len(present)}")
        rng = np.random.default_rng(seed)
        return {present[i] for i in rng.permutation(len(present))[:n]}

    def split_by_case(self, val_fraction: float, seed: int) -> tuple[SliceSet, SliceSet]:
        """Split into (train, validation) by case: no case has slices on both sides (views of
        one copy, :meth:`partition`)."""
        _, train, val = self.partition(self.validation_cases(val_fraction, seed))
        return train, val

    def first_cases(self, n: int, seed: int) -> tuple[SliceSet, SliceSet]:
        """Split off ``n`` randomly chosen whole cases: (chosen, rest) (views of one copy,
        :meth:`partition`)."""
        _, rest, chosen = self.partition(self.random_cases(n, seed))
        return chosen, rest

    @staticmethod
    def concat(sets: Sequence[SliceSet]) -> SliceSet:
        """Join slice sets; case and volume tables are merged (names kept distinct)."""
        if not sets:
            raise DataError("no slices to concatenate")
        cases: list[str] = []
        volumes: list[VolumeInfo] = []
        case_ids, volume_ids = [], []
        for s in sets:
            case_ids.append(s.case_ids + len(cases))
            volume_ids.append(s.volume_ids + len(volumes))
            cases.extend(s.cases)
            volumes.extend(s.volumes)
        return SliceSet(
            images=torch.cat([s.images for s in sets]),
            masks=torch.cat([s.masks for s in sets]),
            case_ids=torch.cat(case_ids),
            volume_ids=torch.cat(volume_ids),
            slice_pos=torch.cat([s.slice_pos for s in sets]),
            cases=cases,
            volumes=volumes,
        )

    def to_arrays(self) -> tuple[dict[str, np.ndarray], dict]:
        """The set as named arrays and a JSON-able record, for storage without pickles
        (:mod:`jras_core.site_store`, :class:`~jras_core.retrieval.store.BankStore`).

        Returns:
            ``({"images": (N, 1, S, S) float16, "masks": (N, S, S) uint8, "case_ids",
            "volume_ids", "slice_pos": (N,) int64}, {"cases": [...], "volumes": [...]})``.
            Images are stored in 16 bits: :func:`preprocess_volume` puts their values on
            float16's grid, so :meth:`from_arrays` gives back the very same float32 values. A
            set whose tensors are views of a larger one (:meth:`rows`) gives its own rows only.
        """
        arrays = {
            "images": self.images.to(torch.float16).numpy(),
            "masks": self.masks.numpy(),
            "case_ids": self.case_ids.numpy(),
            "volume_ids": self.volume_ids.numpy(),
            "slice_pos": self.slice_pos.numpy(),
        }
        return arrays, {"cases": list(self.cases), "volumes": [vars(v) for v in self.volumes]}

    @staticmethod
    def from_arrays(arrays: dict[str, np.ndarray], meta: dict) -> SliceSet:
        """Inverse of :meth:`to_arrays` (images back to float32)."""
        return SliceSet(
            images=torch.from_numpy(np.asarray(arrays["images"], dtype=np.float32)),
            masks=torch.from_numpy(arrays["masks"]),
            case_ids=torch.from_numpy(arrays["case_ids"]),
            volume_ids=torch.from_numpy(arrays["volume_ids"]),
            slice_pos=torch.from_numpy(arrays["slice_pos"]),
            cases=list(meta["cases"]),
            volumes=[VolumeInfo(**{**v, "spacing": tuple(v["spacing"])}) for v in meta["volumes"]],
        )


def resampled_shape(hw: tuple[int, int], spacing: Sequence[float], cfg: PreprocessConfig) -> tuple[int, int]:
    """In-plane size ``(H', W')`` of an ``(H, W)`` slice of ``spacing`` after resampling to the
    spacing ``cfg.fov_mm / cfg.size`` (unchanged when ``cfg.fov_mm`` is None), before crop/pad."""
    h, w = hw
    if cfg.fov_mm is None:
        return h, w
    target = cfg.fov_mm / cfg.size
    return max(1, int(round(h * float(spacing[0]) / target))), max(1, int(round(w * float(spacing[1]) / target)))


PREPROCESS_VERSION = 3
"""The version of :func:`preprocess_volume`'s output, part of a site's slice-cache key: slices
cached by an earlier version are built again. 2: masks resampled on the images' grid
(:func:`_resample_labels`). 3: intensities rounded to float16's grid (the cache stores them in
16 bits)."""


def _resample_labels(mask: np.ndarray, spatial: Sequence[int]) -> np.ndarray:
    """Resample an integer label volume ``(H, W, Z)`` to ``spatial`` on the grid the images
    take (linear interpolation of pixel centres): each present class's indicator map is
    resampled linearly and every voxel takes the class of largest value. Nearest-neighbour
    resampling (torch's ``nearest``) samples at the corner of each output pixel instead, which
    shifts the labels against their image by up to half a pixel, by a different amount at
    each voxel size.

    Returns:
        ``(*spatial)`` labels of ``mask``'s class values.
    """
    classes = np.unique(mask)
    maps = np.stack([(mask == c).astype(np.float32) for c in classes])  # (C, H, W, Z)
    maps = np.asarray(Resize(tuple(spatial), mode="trilinear", anti_aliasing=False)(maps))
    return classes[maps.argmax(axis=0)]


def restore_labels(
    labels: torch.Tensor | np.ndarray, shape: tuple[int, int, int], spacing: Sequence[float],
    cfg: PreprocessConfig,
) -> np.ndarray:
    """Map labels predicted on :func:`preprocess_volume`'s grid back to the volume's own grid.

    The inverse of its spatial steps: the crop/pad to ``cfg.size`` is undone by MONAI's
    inverse of the same transform (the region the crop cut away, or the padding, becomes
    background), then the labels are resampled to the native in-plane size as the
    preprocessing resamples masks (:func:`_resample_labels`: each class's map linearly, the
    largest taken), which keeps the label boundaries smooth where nearest-neighbour
    resampling would make them blocky.

    Args:
        labels: ``(Z, S, S)`` integer labels (``S`` = ``cfg.size``).
        shape: the volume's native ``(H, W, Z)``.
        spacing: its native voxel size ``(sx, sy, sz)`` in mm.
        cfg: the preprocessing that produced the ``S x S`` slices.

    Returns:
        ``(H, W, Z)`` uint8 labels.
    """
    from monai.data import MetaTensor

    labels = torch.as_tensor(np.asarray(labels))
    h, w, z = (int(v) for v in shape)
    if labels.shape != (z, cfg.size, cfg.size):
        raise ValueError(f"labels of shape {tuple(labels.shape)} for {z} slices of {cfg.size} px")
    new_hw = resampled_shape((h, w), spacing, cfg)
    crop = ResizeWithPadOrCrop((cfg.size, cfg.size, -1))
    record = crop(MetaTensor(torch.zeros(1, *new_hw, z)))  # the forward step, for its inverse
    tracked = MetaTensor(labels.permute(1, 2, 0)[None].float())  # (1, S, S, Z)
    tracked.applied_operations = list(record.applied_operations)
    native = crop.inverse(tracked).as_tensor()[0].numpy()  # (H', W', Z), padding 0: background
    if new_hw != (h, w):
        native = _resample_labels(native, (h, w, z))
    return np.rint(native).astype(np.uint8)


def preprocess_volume(vol: Volume, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Resample in-plane, crop/pad to ``cfg.size`` and normalise intensities.

    Args:
        vol: the volume, image and mask ``(H, W, Z)``.
        cfg: preprocessing options.

    Returns:
        image ``(Z, S, S)`` float32 (values on float16's grid, about ``[0, 1]``), mask
        ``(Z, S, S)`` uint8, new spacing ``(sx, sy, sz)``.
    """
    image = vol.image.astype(np.float32)[None]  # (1, H, W, Z)
    mask = vol.mask.astype(np.float32)[None]
    sx, sy, sz = (float(s) for s in vol.spacing)
    h, w, z = image.shape[1:]
    new_hw = resampled_shape((h, w), vol.spacing, cfg)
    if new_hw != (h, w):
        spatial = (*new_hw, z)
        image = np.asarray(Resize(spatial, mode="trilinear", anti_aliasing=True)(image))
        mask = _resample_labels(mask[0], spatial)[None].astype(np.float32)
    if cfg.fov_mm is not None:
        sx = sy = cfg.fov_mm / cfg.size
    crop = ResizeWithPadOrCrop((cfg.size, cfg.size, -1))
    image = np.asarray(crop(image))
    mask = np.asarray(crop(mask))
    lo, hi = cfg.intensity_percentiles
    image = np.asarray(
        ScaleIntensityRangePercentiles(lower=lo, upper=hi, b_min=0.0, b_max=1.0, clip=True)(image)
    )
    # float16's grid (steps of at most 2**-11 relative, 2**-12 below 1): a slice cache holds
    # the images in 16 bits and gives back exactly these values
    image = np.moveaxis(image[0], -1, 0).astype(np.float16).astype(np.float32)
    mask = np.rint(np.moveaxis(mask[0], -1, 0)).astype(np.uint8)
    return image, mask, (sx, sy, sz)


def build_slice_set(
    volumes: Iterable[Volume],
    cfg: PreprocessConfig,
    num_classes: int,
) -> SliceSet:
    """Preprocess volumes into a :class:`SliceSet` (checking each volume first).

    ``volumes`` is consumed one volume at a time: only the kept slices of each volume
    (at ``cfg.size``) are held once it is preprocessed, so a stream of volumes
    (``load_volumes(..., stream=True)``) never has every volume in memory at its native
    resolution. Slices without foreground are dropped unless ``cfg.keep_empty_slices``.
    """
    images, masks, case_ids, volume_ids, slice_pos = [], [], [], [], []
    cases: list[str] = []
    infos: list[VolumeInfo] = []
    names: list[str] = []
    for vol in volumes:
        names.append(vol.source or vol.key)
        vol.check(num_classes)
        img, msk, spacing = preprocess_volume(vol, cfg)
        keep = np.arange(img.shape[0])
        if not cfg.keep_empty_slices:
            keep = keep[msk.reshape(msk.shape[0], -1).max(axis=1) > 0]
        if keep.size == 0:
            log.warning("%s: no labelled slice, skipped", vol.source or vol.key)
            continue
        if vol.case not in cases:
            cases.append(vol.case)
        infos.append(
            VolumeInfo(
                key=vol.key,
                case=vol.case,
                phase=vol.phase,
                vendor=vol.vendor,
                centre=vol.centre,
                spacing=spacing,
                source=vol.source,
            )
        )
        images.append(img[keep])
        masks.append(msk[keep])
        case_ids.append(np.full(keep.size, cases.index(vol.case)))
        volume_ids.append(np.full(keep.size, len(infos) - 1))
        slice_pos.append(keep)
    if not names:
        raise DataError("no volumes to build slices from")
    if not images:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise DataError(
            f"none of the {len(names)} volume(s) has a labelled slice after preprocessing ({shown}): "
            "their masks are all background, or their labels vanish when resampled to "
            f"preprocess.size {cfg.size} over preprocess.fov_mm {cfg.fov_mm}"
        )
    return SliceSet(
        images=torch.from_numpy(np.concatenate(images))[:, None].contiguous(),
        masks=torch.from_numpy(np.concatenate(masks)).contiguous(),
        case_ids=torch.from_numpy(np.concatenate(case_ids)).long(),
        volume_ids=torch.from_numpy(np.concatenate(volume_ids)).long(),
        slice_pos=torch.from_numpy(np.concatenate(slice_pos)).long(),
        cases=cases,
        volumes=infos,
    )
