"""Tests of jras_core.data.synthetic.generator: the synthetic multi-vendor cardiac MRI generator."""

from __future__ import annotations

import numpy as np
import pytest

from jras_core.data.synthetic import BUILTIN_VENDORS, VendorSpec, generate_volumes, get_vendor
from jras_core.data.volume import DataError

SIZE = 64


def _labelled(mask: np.ndarray) -> list[int]:
    """Indices of slices (last axis) with any foreground."""
    return [k for k in range(mask.shape[2]) if mask[..., k].any()]


def _normalised(image: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(image, [1, 99])
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0)


def test_same_seed_gives_identical_arrays():
    a = generate_volumes("A", 2, seed=7, size=SIZE)
    b = generate_volumes("A", 2, seed=7, size=SIZE)
    assert len(a) == len(b) == 4
    for va, vb in zip(a, b):
        assert va.key == vb.key
        np.testing.assert_array_equal(va.image, vb.image)
        np.testing.assert_array_equal(va.mask, vb.mask)


def test_different_seed_differs():
    a = generate_volumes("B", 1, seed=1, size=SIZE, phases=("ED",))[0]
    b = generate_volumes("B", 1, seed=2, size=SIZE, phases=("ED",))[0]
    assert a.mask.shape != b.mask.shape or not np.array_equal(a.mask, b.mask)
    assert a.image.shape != b.image.shape or not np.allclose(a.image, b.image)


def test_vendor_name_is_mixed_into_the_seed():
    # Same appearance and geometry as A, only the name differs: anatomy must differ.
    twin = VendorSpec.from_dict({"base": "A", "name": "A2"})
    a = generate_volumes("A", 2, seed=3, size=SIZE, phases=("ED",))
    t = generate_volumes(twin, 2, seed=3, size=SIZE, phases=("ED",))
    for va, vt in zip(a, t):
        assert va.mask.shape != vt.mask.shape or not np.array_equal(va.mask, vt.mask)
    assert {v.case for v in a}.isdisjoint({v.case for v in t})


@pytest.mark.parametrize("vendor", sorted(BUILTIN_VENDORS))
def test_shapes_labels_spacing_and_metadata(vendor):
    spec = BUILTIN_VENDORS[vendor]
    vols = generate_volumes(vendor, 2, seed=0, size=SIZE)
    assert [(v.case, v.phase) for v in vols] == [
        (f"syn{vendor}000", "ED"),
        (f"syn{vendor}000", "ES"),
        (f"syn{vendor}001", "ED"),
        (f"syn{vendor}001", "ES"),
    ]
    for v in vols:
        assert v.image.dtype == np.float32 and v.mask.dtype == np.int64
        assert v.image.shape[:2] == (SIZE, SIZE) and v.image.shape == v.mask.shape
        assert 5 <= v.image.shape[2] <= 14
        assert set(np.unique(v.mask).tolist()) <= {0, 1, 2, 3}
        assert v.spacing == pytest.approx(
            (spec.fov_mm / SIZE, spec.fov_mm / SIZE, spec.slice_spacing_mm)
        )
        assert 8.0 <= v.spacing[2] <= 10.0
        assert v.vendor == vendor and v.source == f"synthetic:{vendor}"
        assert v.image.min() >= 0.0 and np.isfinite(v.image).all()
        v.check(num_classes=4)
    # ED and ES of a case share the slice geometry (same stack).
    assert vols[0].image.shape == vols[1].image.shape


def test_case_names_unique_across_vendors_and_prefix():
    keys = [v.key for name in "ABCD" for v in generate_volumes(name, 2, 0, size=32, phases=("ED",))]
    assert len(keys) == len(set(keys)) == 8
    custom = generate_volumes("C", 1, 0, size=32, phases=("ES",), case_prefix="site1_")
    assert [v.key for v in custom] == ["site1_C000_ES"]


def test_mid_ventricular_slices_have_all_three_labels():
    for vendor in sorted(BUILTIN_VENDORS):
        for vol in generate_volumes(vendor, 4, seed=11, size=SIZE):
            lab = _labelled(vol.mask)
            assert len(lab) >= 4, (vol.key, lab)
            mid = lab[len(lab) // 3 : len(lab) - len(lab) // 3]
            for k in mid:
                assert set(np.unique(vol.mask[..., k]).tolist()) == {0, 1, 2, 3}, (vol.key, k)


def test_structures_shrink_to_the_apex_and_rv_vanishes():
    for vol in generate_volumes("A", 6, seed=5, size=SIZE):
        lab = _labelled(vol.mask)
        base, apex = vol.mask[..., lab[0]], vol.mask[..., lab[-1]]
        assert (base > 0).sum() > 2 * (apex > 0).sum(), vol.key
        lv_myo = ((apex == 1) | (apex == 2)).sum()
        assert (apex == 3).sum() <= 0.1 * lv_myo, vol.key
        assert (base == 3).sum() > 0, vol.key


def test_end_systole_has_smaller_cavity_and_thicker_wall():
    vols = generate_volumes("B", 4, seed=2, size=SIZE)
    ratios = []
    for ed, es in zip(vols[0::2], vols[1::2]):
        assert (ed.phase, es.phase) == ("ED", "ES") and ed.case == es.case
        lv_ed, lv_es = (ed.mask == 1).sum(), (es.mask == 1).sum()
        assert lv_es < 0.85 * lv_ed  # even a poorly contracting (dilated) heart contracts
        ratios.append(lv_es / lv_ed)
        # Wall thickness grows: myocardium area relative to the epicardial area.
        frac_ed = (ed.mask == 2).sum() / np.isin(ed.mask, (1, 2)).sum()
        frac_es = (es.mask == 2).sum() / np.isin(es.mask, (1, 2)).sum()
        assert frac_es > frac_ed + 0.05
    assert np.mean(ratios) < 0.6  # ejection fraction > 40 % on average


def test_background_is_not_thresholdable():
    # Outside the labelled structures there is a lot of tissue as bright as the myocardium.
    vol = generate_volumes("A", 1, seed=4, size=SIZE, phases=("ED",))[0]
    img = _normalised(vol.image)
    myo = np.median(img[vol.mask == 2])
    outside = img[vol.mask == 0]
    in_band = np.abs(outside - myo) < 0.1
    assert in_band.sum() > 5 * (vol.mask == 2).sum()


def _tissue_stats(vendor: str) -> tuple[float, float, float]:
    """(myocardium/blood ratio after normalisation, raw max, background noise / blood)."""
    ratios, maxima, noise = [], [], []
    for vol in generate_volumes(vendor, 3, seed=21, size=128, phases=("ED",)):
        img = _normalised(vol.image)
        ratios.append(np.median(img[vol.mask == 2]) / np.median(img[vol.mask == 1]))
        maxima.append(float(vol.image.max()))
        corner = vol.image[:6, :6, :]
        noise.append(float(corner.std()) / float(np.median(vol.image[vol.mask == 1])))
    return float(np.mean(ratios)), float(np.mean(maxima)), float(np.mean(noise))


def test_vendors_differ_in_intensity_statistics():
    stats = {v: _tissue_stats(v) for v in "ABCD"}
    ratio = {v: s[0] for v, s in stats.items()}
    # Myocardium is clearly darker than blood everywhere (segmentable) ...
    assert all(r < 0.8 for r in ratio.values()), ratio
    # ... but the contrast of D is far from A-C.
    for v in "ABC":
        assert ratio["D"] - ratio[v] > 0.12, ratio
    # Raw scales like real scanners: ~300 vs ~3000.
    assert stats["B"][1] > 5 * stats["A"][1]
    # D is noisier than A.
    assert stats["D"][2] > 1.5 * stats["A"][2]


def test_vendors_differ_in_field_of_view():
    a = generate_volumes("A", 1, 0, size=SIZE, phases=("ED",))[0]
    d = generate_volumes("D", 1, 0, size=SIZE, phases=("ED",))[0]
    assert a.spacing[0] != pytest.approx(d.spacing[0])
    assert a.spacing[2] != pytest.approx(d.spacing[2])


def test_bad_arguments_rejected():
    with pytest.raises(DataError, match="unknown synthetic vendor"):
        get_vendor("Q")
    with pytest.raises(DataError, match="phases"):
        generate_volumes("A", 1, 0, size=32, phases=("XX",))
    with pytest.raises(DataError, match="size"):
        generate_volumes("A", 1, 0, size=8)
    assert generate_volumes("A", 0, 0, size=32) == []
