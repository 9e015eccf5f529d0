"""Per-case anatomy of the synthetic cardiac generator.

Anatomy is drawn in millimetres from one distribution shared by all vendors:
heart position, size, LV radius, wall thickness, ellipticity, rotation, RV
size and angle, irregular (trabeculated) endocardium, papillary muscles,
long-axis length, slices above the base (atria, unlabelled) and below the
apex, and the ED -> ES contraction. Around the heart sit a body outline with
subcutaneous fat and chest-wall muscle, lungs with vessels, liver, stomach,
spine, descending aorta and epicardial fat, so the heart is not
thresholdable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class _Anatomy:
    """Case-level anatomy parameters (mm, radians); shared by the case's phases."""

    body_c: np.ndarray  # (2,) body centre (x, y)
    body_ax: np.ndarray  # (2,) body semi-axes
    body_rot: float
    body_wobble: np.ndarray  # (K, 2) outline harmonics
    fat_t: float
    muscle_t: float
    heart_c: np.ndarray  # (2,) LV centre at the base, ED
    heart_drift: np.ndarray  # (2,) LV centre shift from base to apex
    rot: float  # in-plane orientation of the heart
    r_endo: float  # LV cavity radius at the base, ED
    wall: float  # myocardial wall thickness at the base, ED
    ellip: float
    endo_wobble: np.ndarray  # (K, 2) amplitude, phase of endocardial harmonics k=2..K+1
    rv_angle: float
    rv_dist: float  # RV ellipse centre distance, fraction of the epicardial radius
    rv_radial: float  # RV radial semi-axis, fraction of the basal epicardial radius
    rv_tangent: float  # RV tangential semi-axis, fraction of the basal epicardial radius
    rv_extent: float  # fraction of the long axis the RV covers
    rv_wall: float
    rv_wobble: np.ndarray
    length: float  # base-to-apex length, ED, mm
    first_pos: float  # position of the first slice from the ED base, mm (negative: above it)
    extra_apex: bool  # one slice beyond the apex
    es_endo: float  # ES / ED cavity radius
    es_wall: float  # ES / ED wall thickness
    es_rv: float  # ES / ED RV size
    es_short: float  # longitudinal shortening at ES, fraction
    pap_angles: np.ndarray  # (2,)
    epi_fat_t: float
    epi_fat_angle: float
    lung_scale: np.ndarray  # (2,)
    lung_wobble: np.ndarray  # (2, K, 2)
    vessels: np.ndarray  # (V, 4): lung index, radial fraction, angle, radius mm
    liver_shift: float
    stomach_w: float  # stomach fluid brightness mix
    stomach_ax: np.ndarray  # (2,)
    aorta_r: float
    pathology: str = "normal"


def _sample_anatomy(rng: np.random.Generator) -> _Anatomy:
    """Draw one case's anatomy (the same distribution for every vendor)."""
    body_c = np.array([rng.normal(0.0, 6.0), rng.normal(12.0, 5.0)])
    body_ax = np.array([rng.uniform(135.0, 165.0), rng.uniform(95.0, 115.0)])
    r_endo = rng.uniform(21.0, 29.0)
    wall = rng.uniform(6.5, 10.0)
    heart_c = body_c + np.array([rng.uniform(-5.0, 20.0), rng.uniform(-35.0, -15.0)])
    anat = _Anatomy(
        body_c=body_c,
        body_ax=body_ax,
        body_rot=rng.uniform(-0.08, 0.08),
        body_wobble=np.stack([rng.uniform(0.0, 0.03, 3), rng.uniform(0, 2 * np.pi, 3)], axis=1),
        fat_t=rng.uniform(7.0, 20.0),
        muscle_t=rng.uniform(8.0, 15.0),
        heart_c=heart_c,
        heart_drift=rng.normal(0.0, 6.0, size=2),
        rot=rng.uniform(-0.3, 0.3),
        r_endo=r_endo,
        wall=wall,
        ellip=rng.uniform(0.0, 0.14),
        endo_wobble=np.stack([rng.uniform(0.0, 0.05, 4), rng.uniform(0, 2 * np.pi, 4)], axis=1),
        rv_angle=np.pi + rng.uniform(0.1, 0.6),
        rv_dist=rng.uniform(0.5, 0.7),
        rv_radial=rng.uniform(0.85, 1.1),
        rv_tangent=rng.uniform(1.2, 1.55),
        rv_extent=rng.uniform(0.72, 0.86),
        rv_wall=rng.uniform(2.5, 3.8),
        rv_wobble=np.stack([rng.uniform(0.0, 0.06, 3), rng.uniform(0, 2 * np.pi, 3)], axis=1),
        length=rng.uniform(62.0, 85.0),
        first_pos=rng.choice([-9.0, 0.0], p=[0.35, 0.65]) + rng.uniform(0.0, 4.0),
        extra_apex=bool(rng.random() < 0.3),
        es_endo=rng.uniform(0.58, 0.74),
        es_wall=rng.uniform(1.3, 1.6),
        es_rv=rng.uniform(0.72, 0.86),
        es_short=rng.uniform(0.08, 0.15),
        pap_angles=np.array([rng.uniform(0.4, 0.8), -rng.uniform(0.5, 0.9)]),
        epi_fat_t=rng.uniform(2.0, 6.0),
        epi_fat_angle=rng.uniform(0, 2 * np.pi),
        lung_scale=rng.uniform(0.85, 1.1, size=2),
        lung_wobble=np.stack(
            [rng.uniform(0.0, 0.08, (2, 3)), rng.uniform(0, 2 * np.pi, (2, 3))], axis=2
        ),
        vessels=np.column_stack(
            [
                rng.integers(0, 2, 8),
                rng.uniform(0.1, 0.75, 8),
                rng.uniform(0, 2 * np.pi, 8),
                rng.uniform(1.5, 3.5, 8),
            ]
        ),
        liver_shift=rng.uniform(-10.0, 15.0),
        stomach_w=rng.uniform(0.2, 0.9),
        stomach_ax=np.array([rng.uniform(22.0, 35.0), rng.uniform(15.0, 25.0)]),
        aorta_r=rng.uniform(9.0, 13.0),
    )
    # Pathology mix, as in multi-centre cohorts: dilated (large thin-walled LV, poor
    # contraction) and hypertrophic (thick wall, small cavity, strong contraction).
    kind, factors = rng.random(), rng.uniform(0.0, 1.0, 3)
    if kind < 0.2:
        anat.pathology = "dilated"
        anat.r_endo *= 1.15 + 0.15 * factors[0]
        anat.wall *= 0.8 + 0.1 * factors[1]
        anat.es_endo = 0.8 + 0.1 * factors[2]
        anat.es_wall = 1.1 + 0.15 * factors[1]
    elif kind < 0.35:
        anat.pathology = "hypertrophic"
        anat.r_endo *= 0.8 + 0.1 * factors[0]
        anat.wall *= 1.4 + 0.3 * factors[1]
        anat.es_endo = 0.45 + 0.12 * factors[2]
    return anat


def _slice_positions(anat: _Anatomy, spacing: float) -> np.ndarray:
    """Slice positions along the long axis, mm from the ED base, shape ``(Z,)``."""
    positions = []
    pos = anat.first_pos
    while pos < 0.985 * anat.length:
        positions.append(pos)
        pos += spacing
    if anat.extra_apex:
        positions.append(pos)
    while len(positions) < 4:  # very coarse slice spacing: keep a usable stack
        positions.append(positions[-1] + spacing)
    return np.asarray(positions, dtype=np.float64)
