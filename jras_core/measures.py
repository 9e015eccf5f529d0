"""Clinical measures of cardiac label maps: chamber and myocardial volumes, myocardial mass,
and the ventricular function of an end-diastole / end-systole pair.

The structures are found by name in the method's label set (``labels.names``: label ``i + 1``
is ``names[i]``): ``LV`` (left-ventricular blood pool), ``MYO`` (left-ventricular myocardium)
and ``RV`` (right-ventricular blood pool). A label set without one of them gives NaN for the
measures of that structure, and :func:`missing_structures` says which are absent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from jras_core.labels import label_ids

MYOCARDIAL_DENSITY_G_PER_ML = 1.05
"""Density of myocardium: mass (g) = myocardial volume (ml) x 1.05."""

STRUCTURES: tuple[str, ...] = ("LV", "MYO", "RV")
"""The label names the measures look up (compared case-insensitively)."""

ED, ES = "ED", "ES"


def structure_labels(names: Sequence[str]) -> dict[str, int]:
    """Label id of each of :data:`STRUCTURES` present in a label set.

    Args:
        names: foreground class names (``labels.names``); label ``i + 1`` is ``names[i]``.

    Returns:
        ``{"LV": id, ...}`` for the structures the set names; absent ones are left out.
    """
    lookup = label_ids(names)
    return {s: lookup[s] for s in STRUCTURES if s in lookup}


def missing_structures(names: Sequence[str]) -> list[str]:
    """The structures of :data:`STRUCTURES` that the label set ``names`` lacks."""
    found = structure_labels(names)
    return [s for s in STRUCTURES if s not in found]


def voxel_volume_ml(spacing: Sequence[float]) -> float:
    """Volume of one voxel of ``spacing`` ``(sx, sy, sz)`` mm, in ml (1 ml = 1000 mm^3)."""
    if len(spacing) != 3:
        raise ValueError(f"spacing must have 3 values (mm), got {tuple(spacing)}")
    return float(np.prod([float(s) for s in spacing])) / 1000.0


@dataclass(frozen=True)
class VolumeMeasures:
    """Measures of one label map (NaN for a structure the label set lacks).

    Attributes:
        lv_ml: left-ventricular blood-pool volume, ml.
        myo_ml: myocardial volume, ml.
        myo_mass_g: myocardial mass, g (``myo_ml`` x :data:`MYOCARDIAL_DENSITY_G_PER_ML`).
        rv_ml: right-ventricular blood-pool volume, ml.
    """

    lv_ml: float
    myo_ml: float
    myo_mass_g: float
    rv_ml: float


def measure_volume(labels: np.ndarray, spacing: Sequence[float], names: Sequence[str]) -> VolumeMeasures:
    """Volumes and mass of a label map.

    Args:
        labels: integer label map of any shape (e.g. ``(H, W, Z)``), ids as ``names`` says.
        spacing: voxel size ``(sx, sy, sz)`` in mm.
        names: foreground class names of the label set.
    """
    ids = structure_labels(names)
    per_voxel = voxel_volume_ml(spacing)
    labels = np.asarray(labels)

    def ml(structure: str) -> float:
        if structure not in ids:
            return math.nan
        return float(np.count_nonzero(labels == ids[structure])) * per_voxel

    myo = ml("MYO")
    return VolumeMeasures(lv_ml=ml("LV"), myo_ml=myo, myo_mass_g=myo * MYOCARDIAL_DENSITY_G_PER_ML, rv_ml=ml("RV"))


def ejection_fraction(edv: float, esv: float) -> float:
    """``(EDV - ESV) / EDV`` in percent; NaN when EDV is not positive or either is NaN."""
    if not (edv > 0) or math.isnan(esv):
        return math.nan
    return 100.0 * (edv - esv) / edv


@dataclass(frozen=True)
class Function:
    """Ventricular function of an ED/ES pair: volumes in ml, ejection fraction in percent."""

    edv_ml: float
    esv_ml: float
    sv_ml: float
    ef_pct: float

    @classmethod
    def of(cls, edv: float, esv: float) -> Function:
        return cls(edv_ml=edv, esv_ml=esv, sv_ml=edv - esv, ef_pct=ejection_fraction(edv, esv))


@dataclass(frozen=True)
class PhasePair:
    """The end-diastolic and end-systolic volumes of one case.

    Attributes:
        case: the case id.
        ed, es: keys of the two volumes (as given to :func:`pair_phases`).
        rule: how ED and ES were told apart: ``metadata`` (phases given by the input: a
            manifest's phase column, a file name or ACDC's ``Info.cfg``) or
            ``larger LV volume`` (the volume with the larger LV blood pool is ED).
        lv, rv: left- and right-ventricular function.
    """

    case: str
    ed: str
    es: str
    rule: str
    lv: Function
    rv: Function


RULE_METADATA = "metadata"
RULE_LV_VOLUME = "larger LV volume"


def pair_phases(
    volumes: Mapping[str, tuple[str, str, VolumeMeasures]],
) -> tuple[list[PhasePair], dict[str, str]]:
    """Pair the end-diastolic and end-systolic volumes of each case.

    A case's pair is its volumes labelled ``ED`` and ``ES`` when it has exactly one of each
    (rule ``metadata``). Otherwise, with exactly two volumes, the one with the larger LV
    blood pool is ED (rule ``larger LV volume``). A case with one volume, with more than
    two without an ED and an ES label, or without an LV label in the label set, has no pair.

    Args:
        volumes: ``{key: (case, phase or "", measures)}`` of every volume.

    Returns:
        the pairs, in order of each case's first volume, and the phase given to every paired
        volume by its rule, ``{key: "ED" or "ES"}``.
    """
    cases: dict[str, list[str]] = {}
    for key, (case, _, _) in volumes.items():
        cases.setdefault(case, []).append(key)
    pairs, phases = [], {}
    for case, keys in cases.items():
        tagged = {p: [k for k in keys if volumes[k][1].upper() == p] for p in (ED, ES)}
        if len(tagged[ED]) == 1 and len(tagged[ES]) == 1:
            ed, es, rule = tagged[ED][0], tagged[ES][0], RULE_METADATA
        elif len(keys) == 2 and not any(math.isnan(volumes[k][2].lv_ml) for k in keys):
            ed, es = sorted(keys, key=lambda k: volumes[k][2].lv_ml, reverse=True)
            rule = RULE_LV_VOLUME
        else:
            continue
        m_ed, m_es = volumes[ed][2], volumes[es][2]
        pairs.append(PhasePair(case, ed, es, rule, Function.of(m_ed.lv_ml, m_es.lv_ml),
                               Function.of(m_ed.rv_ml, m_es.rv_ml)))
        phases[ed], phases[es] = ED, ES
    return pairs, phases


__all__ = [
    "ED",
    "ES",
    "MYOCARDIAL_DENSITY_G_PER_ML",
    "RULE_LV_VOLUME",
    "RULE_METADATA",
    "STRUCTURES",
    "Function",
    "PhasePair",
    "VolumeMeasures",
    "ejection_fraction",
    "measure_volume",
    "missing_structures",
    "pair_phases",
    "structure_labels",
    "voxel_volume_ml",
]
