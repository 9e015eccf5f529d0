"""Segmenting unlabelled volumes with a trained model: the inputs, the prediction of one volume
on its own grid, and a run over many inputs that writes masks, overlays and measurements.

A volume is predicted exactly as evaluation predicts (:func:`jras_core.training.evaluate.predict`:
the same preprocessing, two-pass retrieval from a site's bank, post-processing), then its labels
are mapped back to the input's own grid (:func:`jras_core.data.slices.restore_labels`), so that
each written mask has the input's shape, affine and header.

Output folder::

    OUT/masks/<input stem>_seg.nii.gz   one label map per input
    OUT/overlays/<case>.png             mid-ventricular slice of each of the case's volumes
    OUT/measurements.csv                volumes, mass and, per ED/ES pair, ventricular function

Every file is written atomically and the table is rewritten after each volume, so a run that
stops (a bad input under ``on_error="stop"``, an interruption) leaves complete files of every
volume it finished.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from jras_core.config import ConfigError, JRASConfig
from jras_core.data.loaders.acdc import _read_info_cfg
from jras_core.data.loaders.common import _read_csv, read_nifti_image
from jras_core.data.slices import SliceSet, VolumeInfo, preprocess_volume, restore_labels
from jras_core.data.volume import DataError, Volume
from jras_core.files import atomic_write_bytes, atomic_write_text
from jras_core.labels import label_ids
from jras_core.measures import (
    PhasePair,
    VolumeMeasures,
    measure_volume,
    missing_structures,
    pair_phases,
)
from jras_core.models.jras import JRASModel
from jras_core.overlays import OverlayPanel, mid_ventricular_slice, overlay_png
from jras_core.retrieval.bank import RetrievalBank

log = logging.getLogger(__name__)

NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
LABEL_MAP_SUFFIXES: tuple[str, ...] = ("_gt", "_seg", "_mask", "_label", "_labels")
"""Name endings (before ``.nii[.gz]``) of label maps, which a folder of inputs skips."""

_PHASE_NAME = re.compile(r"^(?P<case>.+?)(?:_sa)?_(?P<phase>ED|ES)$", re.IGNORECASE)
_FRAME_NAME = re.compile(r"^(?P<case>.+?)_frame(?P<frame>\d+)$", re.IGNORECASE)


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class PredictInput:
    """One image to segment.

    Attributes:
        path: the NIfTI image.
        case: the patient / subject id (volumes of one case are paired ED/ES).
        phase: ``ED``, ``ES`` or ``""`` (unknown).
        phase_source: where ``phase`` came from: ``manifest``, ``file name``, ``Info.cfg``, or ``""``.
    """

    path: Path
    case: str
    phase: str = ""
    phase_source: str = ""

    @property
    def stem(self) -> str:
        """The file name without ``.nii`` / ``.nii.gz``."""
        return nifti_stem(self.path) or self.path.name


def nifti_stem(path: str | Path) -> str | None:
    """The name of a NIfTI file without its suffix, or None for another file."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def describe_file(path: str | Path) -> PredictInput:
    """Case and phase of an image from its name, as the fixtures and official layouts name them:
    ``<case>_ED`` / ``<case>_sa_ES`` (phase in the name) or ACDC's ``<case>_frameNN`` (phase from
    the ``Info.cfg`` beside it, when it lists the frame); otherwise the stem is the case and the
    phase is unknown."""
    path = Path(path)
    stem = nifti_stem(path) or path.name
    named = _PHASE_NAME.match(stem)
    if named:
        return PredictInput(path, named["case"], named["phase"].upper(), "file name")
    framed = _FRAME_NAME.match(stem)
    if framed:
        info = path.parent / "Info.cfg"
        if info.is_file():
            cfg = _read_info_cfg(info)
            for phase in ("ED", "ES"):
                try:
                    if int(cfg.get(phase, "-1")) == int(framed["frame"]):
                        return PredictInput(path, framed["case"], phase, "Info.cfg")
                except ValueError:
                    continue
        return PredictInput(path, framed["case"])
    return PredictInput(path, stem)


def _manifest_inputs(path: Path) -> list[PredictInput]:
    """The images of a manifest CSV: an ``image`` column (paths relative to the CSV's folder or
    absolute); ``case`` and ``phase`` columns where present, else from the file names. A
    ``mask`` column is ignored."""
    header, rows = _read_csv(path)
    if "image" not in header:
        raise DataError(f"{path}: manifest has no 'image' column; found {[h for h in header if h]}")
    if not rows:
        raise DataError(f"{path}: empty manifest (header but no rows)")
    out = []
    for line, row in enumerate(rows, start=2):
        if not row["image"]:
            raise DataError(f"{path}: line {line}: empty 'image' value")
        # as written (relative to the CSV's folder), symbolic links kept: the mask is named after it
        image = Path(row["image"]).expanduser()
        image = Path(os.path.abspath(image if image.is_absolute() else path.parent / image))
        named = describe_file(image)
        case = row.get("case") or named.case
        phase = (row.get("phase") or "").upper()
        if phase:
            out.append(PredictInput(image, case, phase, "manifest"))
        else:
            out.append(PredictInput(image, case, named.phase, named.phase_source))
    return out


def collect_inputs(sources: Iterable[str | Path]) -> list[PredictInput]:
    """The images named by ``sources``: NIfTI files, folders (every ``.nii``/``.nii.gz`` under
    them, label maps such as ``*_gt.nii.gz`` skipped) and manifest CSVs (:func:`_manifest_inputs`).

    Inputs are returned grouped by case (in order of first appearance), each once.

    Raises:
        DataError: a source that does not exist, is neither NIfTI, folder nor CSV, a folder
            without images, or two inputs whose masks would get the same name.
    """
    found: list[PredictInput] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            images = sorted(
                p for p in path.rglob("*")
                if p.is_file() and (stem := nifti_stem(p)) and not stem.lower().endswith(LABEL_MAP_SUFFIXES)
            )
            if not images:
                raise DataError(f"{path}: no NIfTI image (.nii, .nii.gz) in the folder")
            found.extend(describe_file(p) for p in images)
        elif path.suffix.lower() == ".csv":
            if not path.is_file():
                raise DataError(f"{path}: manifest file not found")
            found.extend(_manifest_inputs(path))
        elif nifti_stem(path):
            found.append(describe_file(path))  # a missing file is reported when it is read
        elif not path.exists():
            raise DataError(f"{path}: no such file or folder")
        else:
            raise DataError(f"{path}: not a NIfTI image (.nii, .nii.gz), a folder or a manifest CSV")
    if not found:
        raise DataError("no input given: name NIfTI files, folders or a manifest CSV")
    unique: dict[Path, PredictInput] = {}
    for item in found:
        unique.setdefault(Path(os.path.abspath(item.path)), item)
    items = list(unique.values())
    stems: dict[str, Path] = {}
    for item in items:
        if item.stem in stems:
            raise DataError(f"{item.path} and {stems[item.stem]}: two inputs named {item.stem}; "
                            "their masks would overwrite each other (rename one)")
        stems[item.stem] = item.path
    order: dict[str, int] = {}
    for item in items:
        order.setdefault(item.case, len(order))
    return sorted(items, key=lambda it: order[it.case])


# --------------------------------------------------------------------------- one volume


class Predictor:
    """A model, its method config and a bank, predicting one volume at a time.

    Args:
        model: the trained model, placed on its device.
        cfg: the method config it was trained with (preprocessing, labels, retrieval, post-processing).
        bank: the site's bank, embedded with ``model``'s retriever (None: a method without retrieval).
        use_guides: predict with retrieved guides (False: the segmenter's guide-free path).
    """

    def __init__(self, model: JRASModel, cfg: JRASConfig, bank: RetrievalBank | None, use_guides: bool = True):
        if cfg.uses_retrieval and use_guides and bank is None:
            raise ConfigError("a retrieval method predicts with a site's bank: give the site (--site)")
        self.model = model
        self.cfg = cfg
        self.bank = bank
        self.use_guides = use_guides and cfg.uses_retrieval

    @classmethod
    def for_site(cls, model: JRASModel, cfg: JRASConfig, site: Any) -> Predictor:
        """Predict as evaluation does at ``site`` (a :class:`~jras_core.site.Site`): retrieval from
        its bank (its training slices, or its support cases), embedded with the model's retriever;
        a site that never trained (``support_cases``) first adapts the model and decides on its
        support cases whether to use its guides, as :meth:`Site.evaluate` does."""
        from jras_core.training.adapt import adapt_to_site, choose_guides

        bank = site.bank if cfg.uses_retrieval else None
        held_out = site.config.support_cases is not None
        if held_out:
            model = adapt_to_site(model, site.train_set, cfg, bank)
        if bank is not None:
            bank = site.refresh_bank(model.retr)
        use = True
        if held_out:
            use = choose_guides(model, site.train_set, cfg, bank).use_guides
        return cls(model, cfg, bank, use_guides=use)

    def predict(self, image: np.ndarray, spacing: Sequence[float], case: str, phase: str = "") -> np.ndarray:
        """Labels of one volume on its own grid.

        Args:
            image: ``(H, W, Z)`` float32 intensities.
            spacing: voxel size ``(sx, sy, sz)`` in mm.
            case, phase: the volume's case and phase; a bank slice of the same case (or volume,
                as ``retrieval.exclude`` says) is never its guide, as in evaluation.

        Returns:
            ``(H, W, Z)`` uint8 labels ``0..C-1`` of ``cfg.labels``.
        """
        from jras_core.training.evaluate import predict

        cfg = self.cfg
        spacing3 = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
        vol = Volume(image=image, mask=np.zeros(image.shape, dtype=np.int64), spacing=spacing3, case=case,
                     phase=phase)
        slices_img, _, pre_spacing = preprocess_volume(vol, cfg.preprocess)  # (Z, S, S)
        z = slices_img.shape[0]
        slices = SliceSet(
            images=torch.from_numpy(slices_img)[:, None].contiguous(),
            masks=torch.zeros(slices_img.shape, dtype=torch.uint8),
            case_ids=torch.zeros(z, dtype=torch.long),
            volume_ids=torch.zeros(z, dtype=torch.long),
            slice_pos=torch.arange(z, dtype=torch.long),
            cases=[case],
            volumes=[VolumeInfo(key=vol.key, case=case, phase=phase, vendor="", centre="", spacing=pre_spacing)],
        )
        source = "retrieved" if self.use_guides else "none"
        pred, _ = predict(self.model, slices, cfg, self.bank if self.use_guides else None, source)
        return restore_labels(pred, image.shape, spacing3, cfg.preprocess)


def mask_image(labels: np.ndarray, like: Any) -> Any:
    """A NIfTI image of ``labels`` on the grid of the nibabel image ``like``: its shape (a 2-D or
    ``(H, W, Z, 1)`` input gets its own shape back), affine and header, with the data type set
    to uint8 and no intensity scaling."""
    data = np.asarray(labels, dtype=np.uint8).reshape(like.shape)
    header = like.header.copy()
    header.set_data_dtype(np.uint8)
    img = type(like)(data, like.affine, header)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0, int(data.max()) if data.size else 0
    return img


def write_mask(path: str | Path, labels: np.ndarray, like: Any) -> Path:
    """Write :func:`mask_image` of ``labels`` to ``path`` (``.nii.gz``: compressed) atomically."""
    path = Path(path)
    data = mask_image(labels, like).to_bytes()
    if path.name.lower().endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    return atomic_write_bytes(path, data)


# --------------------------------------------------------------------------- a run


MEASUREMENT_COLUMNS: tuple[str, ...] = (
    "case", "phase", "phase_rule", "input", "mask", "lv_ml", "myo_ml", "myo_mass_g", "rv_ml",
    "lv_edv_ml", "lv_esv_ml", "lv_sv_ml", "lv_ef_pct", "rv_edv_ml", "rv_esv_ml", "rv_sv_ml", "rv_ef_pct",
)
"""Columns of ``measurements.csv``: one row per volume; the ventricular function of a case's
ED/ES pair is repeated on both of its rows (empty for an unpaired volume). ``phase_rule``
says how the pair's phases were told apart (:func:`jras_core.measures.pair_phases`)."""


@dataclass
class PredictedVolume:
    """What a run keeps of one predicted volume."""

    input: PredictInput
    mask: Path
    measures: VolumeMeasures
    panel: OverlayPanel


@dataclass
class PredictReport:
    """The outcome of :func:`predict_inputs`.

    Attributes:
        done: the volumes predicted and written.
        failed: ``(input file, problem)`` of every input that could not be predicted.
        pairs: the ED/ES pairs found among ``done``.
        stopped: the run stopped at the first failure (``on_error="stop"``).
        out_dir: the output folder.
    """

    done: list[PredictedVolume] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    pairs: list[PhasePair] = field(default_factory=list)
    stopped: bool = False
    out_dir: Path | None = None

    @property
    def measurements(self) -> Path | None:
        return self.out_dir / "measurements.csv" if self.out_dir is not None else None


def _cell(value: float) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def measurements_table(done: Sequence[PredictedVolume], out_dir: Path) -> tuple[str, list[PhasePair]]:
    """The CSV text of ``measurements.csv`` (:data:`MEASUREMENT_COLUMNS`) and the ED/ES pairs."""
    by_key = {v.input.stem: v for v in done}
    pairs, phases = pair_phases({k: (v.input.case, v.input.phase, v.measures) for k, v in by_key.items()})
    pair_of = {key: p for p in pairs for key in (p.ed, p.es)}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MEASUREMENT_COLUMNS)
    for key, v in by_key.items():
        m, p = v.measures, pair_of.get(key)
        function = [""] * 8
        if p is not None:
            function = [_cell(x) for f in (p.lv, p.rv) for x in (f.edv_ml, f.esv_ml, f.sv_ml, f.ef_pct)]
        mask = v.mask.relative_to(out_dir) if v.mask.is_relative_to(out_dir) else v.mask
        writer.writerow([v.input.case, phases.get(key, v.input.phase), p.rule if p else "", str(v.input.path),
                         str(mask), _cell(m.lv_ml), _cell(m.myo_ml), _cell(m.myo_mass_g), _cell(m.rv_ml), *function])
    return buf.getvalue(), pairs


def _case_file(case: str) -> str:
    """A file name for a case id (characters other than letters, digits, ``-._`` become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", case) or "case"


def predict_inputs(
    predictor: Predictor,
    inputs: Sequence[PredictInput],
    out_dir: str | Path,
    on_error: Literal["skip", "stop"] = "skip",
    progress: bool = True,
    on_failure: Callable[[Path, str], None] | None = None,
) -> PredictReport:
    """Predict every input and write its mask, its case's overlay and the measurements table.

    Args:
        predictor: the model, config and bank.
        inputs: the images (:func:`collect_inputs`).
        out_dir: output folder (created; files of the same names are replaced).
        on_error: at a bad or unreadable input (:class:`DataError`): ``skip`` it and go on, or
            ``stop`` the run. Either way it is named in ``failed``, and everything written for
            the inputs before it stays complete.
        progress: show a progress bar.
        on_failure: called with ``(input file, problem)`` at each failure, as it happens.

    Returns:
        the run's :class:`PredictReport`.
    """
    from tqdm.auto import tqdm

    if on_error not in ("skip", "stop"):
        raise ValueError(f"on_error must be 'skip' or 'stop', got {on_error!r}")
    out = Path(out_dir)
    names = predictor.cfg.labels.names
    lv_label = label_ids(names).get("LV")
    absent = missing_structures(names)
    if absent:
        log.warning("the label set %s has no %s: those measures are left empty", list(names), ", ".join(absent))
    report = PredictReport(out_dir=out)
    for item in tqdm(inputs, desc="predict", unit="volume", disable=not progress):
        try:
            image, spacing, nifti = read_nifti_image(item.path)
            labels = predictor.predict(image, spacing, item.case, item.phase)
        except DataError as exc:
            report.failed.append((item.path, str(exc)))
            log.warning("%s", exc)
            if on_failure is not None:
                on_failure(item.path, str(exc))
            if on_error == "stop":
                report.stopped = True
                break
            continue
        mask = write_mask(out / "masks" / f"{item.stem}_seg.nii.gz", labels, nifti)
        k = mid_ventricular_slice(labels, lv_label)
        title = f"{item.phase or item.stem}  (slice {k + 1}/{labels.shape[2]})"
        panel = OverlayPanel(image[:, :, k], labels[:, :, k], title)
        report.done.append(PredictedVolume(item, mask, measure_volume(labels, spacing, names), panel))
        table, report.pairs = measurements_table(report.done, out)
        atomic_write_text(out / "measurements.csv", table)
        case_panels = [v.panel for v in report.done if v.input.case == item.case]
        atomic_write_bytes(out / "overlays" / f"{_case_file(item.case)}.png",
                           overlay_png(case_panels, names, title=f"{item.case}: predicted labels"))
    return report


__all__ = [
    "LABEL_MAP_SUFFIXES",
    "MEASUREMENT_COLUMNS",
    "NIFTI_SUFFIXES",
    "PredictInput",
    "PredictReport",
    "PredictedVolume",
    "Predictor",
    "collect_inputs",
    "describe_file",
    "mask_image",
    "measurements_table",
    "nifti_stem",
    "predict_inputs",
    "write_mask",
]
