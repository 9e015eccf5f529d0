"""Tests of jras_core.measures: volumes, mass and ventricular function from label maps."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
from shared_data import SHARED, needs

from jras_core.measures import (
    MYOCARDIAL_DENSITY_G_PER_ML,
    RULE_LV_VOLUME,
    RULE_METADATA,
    ejection_fraction,
    measure_volume,
    missing_structures,
    pair_phases,
    structure_labels,
    voxel_volume_ml,
)

NAMES = ["LV", "MYO", "RV"]


def test_volumes_count_voxels_times_their_volume():
    labels = np.zeros((6, 5, 4), dtype=np.uint8)
    labels[0, :, 0] = 1  # 5 LV voxels
    labels[1:3, 0:3, 1] = 2  # 6 MYO voxels
    labels[5, 4, 3] = 3  # 1 RV voxel
    m = measure_volume(labels, (2.0, 1.5, 10.0), NAMES)  # 30 mm^3 = 0.03 ml per voxel
    assert m.lv_ml == pytest.approx(5 * 0.03)
    assert m.myo_ml == pytest.approx(6 * 0.03)
    assert m.myo_mass_g == pytest.approx(6 * 0.03 * 1.05)
    assert m.rv_ml == pytest.approx(0.03)


def test_structures_are_found_by_name_not_by_number():
    labels = np.array([[[1, 1, 1, 2, 3]]])
    swapped = measure_volume(labels, (10.0, 10.0, 10.0), ["rv", "MYO", "lv"])  # 1 ml per voxel
    assert (swapped.rv_ml, swapped.myo_ml, swapped.lv_ml) == (3.0, 1.0, 1.0)
    assert structure_labels(["rv", "MYO", "lv"]) == {"LV": 3, "MYO": 2, "RV": 1}


def test_a_label_set_without_a_structure_says_so():
    assert missing_structures(["LV", "MYO"]) == ["RV"]
    assert missing_structures(["lesion"]) == ["LV", "MYO", "RV"]
    m = measure_volume(np.ones((2, 2, 2), dtype=np.uint8), (1.0, 1.0, 1.0), ["LV", "MYO"])
    assert m.lv_ml == pytest.approx(0.008) and math.isnan(m.rv_ml)


def test_ejection_fraction_and_its_undefined_cases():
    assert ejection_fraction(150.0, 60.0) == pytest.approx(60.0)
    assert math.isnan(ejection_fraction(0.0, 0.0))
    assert math.isnan(ejection_fraction(float("nan"), 10.0))
    with pytest.raises(ValueError, match="3 values"):
        voxel_volume_ml((1.0, 1.0))


def _measures(lv: float):
    labels = np.zeros((10, 10, 1), dtype=np.uint8)
    labels.flat[: int(lv)] = 1
    return measure_volume(labels, (10.0, 10.0, 10.0), NAMES)  # 1 ml per voxel


def test_pairs_use_phases_given_else_the_larger_lv_is_end_diastole():
    pairs, phases = pair_phases({
        "a_es": ("a", "ES", _measures(80)), "a_ed": ("a", "ED", _measures(40)),  # given phases win
        "b_1": ("b", "", _measures(30)), "b_2": ("b", "", _measures(90)),
        "c_1": ("c", "", _measures(50)),  # one volume: no pair
        "d_1": ("d", "", _measures(5)), "d_2": ("d", "", _measures(6)), "d_3": ("d", "", _measures(7)),
    })
    assert [p.case for p in pairs] == ["a", "b"]
    a, b = pairs
    assert (a.ed, a.es, a.rule) == ("a_ed", "a_es", RULE_METADATA)
    assert a.lv.ef_pct == pytest.approx(100 * (40 - 80) / 40)
    assert (b.ed, b.es, b.rule) == ("b_2", "b_1", RULE_LV_VOLUME)
    assert (b.lv.edv_ml, b.lv.esv_ml, b.lv.sv_ml) == (90.0, 30.0, 60.0)
    assert b.lv.ef_pct == pytest.approx(100 * 60 / 90)
    assert phases == {"a_ed": "ED", "a_es": "ES", "b_2": "ED", "b_1": "ES"}


@needs("acdc", "mnms-sample")
@pytest.mark.parametrize("fixture,case", [("acdc", "patient001"), ("mnms-sample", "H1N8S6")])
def test_ground_truth_measures_equal_a_hand_computation(fixture: str, case: str):
    """On real ground-truth masks (M&Ms labels: 1 LV, 2 MYO, 3 RV), every measure equals the
    voxel count times the voxel volume from the header."""
    folder = SHARED / fixture
    stems = {"acdc": f"{case}_{{}}_gt", "mnms-sample": f"{case}_sa_{{}}_gt"}[fixture]
    found = {}
    for phase in ("ED", "ES"):
        img = nib.load(str(folder / f"{stems.format(phase)}.nii.gz"))
        mask = np.rint(np.asarray(img.dataobj)).astype(int)
        zooms = img.header.get_zooms()[:3]
        voxel_ml = float(zooms[0]) * float(zooms[1]) * float(zooms[2]) / 1000.0
        counts = {label: int((mask == label).sum()) for label in (1, 2, 3)}
        m = measure_volume(mask, zooms, NAMES)
        assert m.lv_ml == pytest.approx(counts[1] * voxel_ml, rel=1e-12)
        assert m.myo_ml == pytest.approx(counts[2] * voxel_ml, rel=1e-12)
        assert m.rv_ml == pytest.approx(counts[3] * voxel_ml, rel=1e-12)
        assert m.myo_mass_g == pytest.approx(counts[2] * voxel_ml * MYOCARDIAL_DENSITY_G_PER_ML, rel=1e-12)
        found[phase] = (counts, voxel_ml, m)
    (pair,), _ = pair_phases({p: (case, p, found[p][2]) for p in ("ED", "ES")})
    edv, esv = (found[p][0][1] * found[p][1] for p in ("ED", "ES"))
    assert edv > esv > 0  # the fixture's ED is the fuller ventricle
    assert pair.lv.ef_pct == pytest.approx(100.0 * (edv - esv) / edv, rel=1e-9)
    redv, resv = (found[p][0][3] * found[p][1] for p in ("ED", "ES"))
    assert pair.rv.sv_ml == pytest.approx(redv - resv, rel=1e-9)
