"""Deterministic synthetic multi-vendor cardiac short-axis cine MRI.

The project's embedded default dataset. Every case is a stack of short-axis
slices from the ventricular base to the apex, at end-diastole (ED) and
end-systole (ES), with labels in the M&Ms convention (0 background, 1 LV blood
pool, 2 LV myocardium, 3 RV blood pool).

Anatomy is drawn in millimetres from one distribution shared by all vendors:
heart position, size, LV radius, wall thickness, ellipticity, rotation, RV
size and angle, irregular (trabeculated) endocardium, papillary muscles,
long-axis length, slices above the base (atria, unlabelled) and below the
apex, and the ED -> ES contraction. Around the heart sit a body outline with
subcutaneous fat and chest-wall muscle, lungs with vessels, liver, stomach,
spine, descending aorta and epicardial fat, so the heart is not
thresholdable.

A vendor (:class:`VendorSpec`) only changes the appearance: tissue
intensities, contrast curve, intensity scale, noise (Rician or Gaussian,
band-limited by the acquisition), coil bias field, k-space resolution (with
Gibbs ringing), extra blur, Nyquist ghosting, field of view (so pixel spacing)
and slice spacing. Vendor ``D`` differs most from ``A``-``C``: low
blood/myocardium contrast, dark fat, bright liver, coarse acquisition, strong
noise and bias, ghosting and a tight field of view.

Generation is vectorised numpy over all slices of a volume (approximate
signed distance fields on a millimetre grid, FFT filtering).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jras_core.data.volume import DataError, Volume
from jras_core.files import atomic_write_text

log = logging.getLogger(__name__)

PHASES: tuple[str, ...] = ("ED", "ES")
"""Cardiac phases the generator knows."""

LABELS: dict[int, str] = {0: "background", 1: "LV", 2: "MYO", 3: "RV"}
"""Mask labels (M&Ms convention)."""

MANIFEST_HEADER: tuple[str, ...] = ("case", "phase", "vendor", "centre", "image", "mask")

DEFAULT_CASE_PREFIX = "syn"

_TISSUES: tuple[str, ...] = ("blood", "rv_blood", "myocardium", "tissue", "fat", "liver", "lung")


# --------------------------------------------------------------------------- vendors


@dataclass(frozen=True)
class VendorSpec:
    """Appearance of one (synthetic) scanner vendor.

    Tissue intensities are relative, in ``[0, 1]``; the noiseless image is
    ``relative ** gamma``, then bias field, ghost, k-space filtering and noise,
    then multiplied by ``scale`` and a per-volume gain in ``[0.85, 1.2]``.
    Unspecified fields take vendor ``A``'s values.

    Attributes:
        name: vendor name (used in case names, ``Volume.vendor`` and seeding).
        blood: LV blood pool intensity.
        rv_blood: RV blood pool intensity.
        myocardium: myocardium (and RV free wall, papillary muscles) intensity.
        tissue: skeletal muscle / generic soft tissue intensity.
        fat: subcutaneous and epicardial fat intensity.
        liver: liver intensity.
        lung: lung parenchyma intensity.
        gamma: contrast curve exponent applied to relative intensities.
        scale: intensity scale (the brightest tissue is about this value).
        noise_std: noise standard deviation, as a fraction of ``scale``.
        rician: magnitude image (Rician noise) if true, else real image (Gaussian noise).
        bias_strength: strength of the smooth multiplicative coil bias field
            (log-intensity amplitude).
        blur_mm: Gaussian blur sigma in mm (reconstruction filtering).
        acq_matrix: acquired k-space matrix side over the field of view; the
            effective in-plane resolution is ``fov_mm / acq_matrix`` (hard
            k-space truncation, so Gibbs ringing when coarser than the pixels).
        fov_mm: square in-plane field of view in mm; pixel spacing is ``fov_mm / size``.
        slice_spacing_mm: distance between short-axis slices in mm.
        ghost: amplitude of the Nyquist (half-FOV) ghost along the phase-encoding axis.
        texture: amplitude of smooth multiplicative tissue texture.
        description: free text.
    """

    name: str
    blood: float = 0.85
    rv_blood: float = 0.82
    myocardium: float = 0.22
    tissue: float = 0.30
    fat: float = 0.95
    liver: float = 0.30
    lung: float = 0.04
    gamma: float = 1.0
    scale: float = 300.0
    noise_std: float = 0.025
    rician: bool = True
    bias_strength: float = 0.25
    blur_mm: float = 0.5
    acq_matrix: int = 224
    fov_mm: float = 300.0
    slice_spacing_mm: float = 10.0
    ghost: float = 0.0
    texture: float = 0.06
    description: str = ""

    @property
    def resolution_mm(self) -> float:
        """Effective acquired in-plane resolution, mm."""
        return self.fov_mm / self.acq_matrix

    def validate(self, source: str = "") -> None:
        """Raise :class:`DataError` naming the first invalid field."""
        where = f"{source}: " if source else ""

        def bad(key: str, why: str) -> DataError:
            return DataError(
                f"{where}vendor '{self.name}': key '{key}' {why}, got {getattr(self, key)!r}"
            )

        if not isinstance(self.name, str) or not self.name.strip():
            raise DataError(
                f"{where}vendor key 'name' must be a non-empty string, got {self.name!r}"
            )
        for key in _TISSUES:
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise bad(key, "must be a relative intensity in [0, 1]")
        positive = ("gamma", "scale", "fov_mm", "slice_spacing_mm")
        for key in positive:
            if not getattr(self, key) > 0:
                raise bad(key, "must be > 0")
        for key in ("noise_std", "bias_strength", "blur_mm"):
            if not getattr(self, key) >= 0:
                raise bad(key, "must be >= 0")
        if self.noise_std > 1.0:
            raise bad("noise_std", "must be <= 1 (a fraction of scale)")
        if self.bias_strength > 2.0:
            raise bad("bias_strength", "must be <= 2")
        if not 0.0 <= self.ghost < 1.0:
            raise bad("ghost", "must be in [0, 1)")
        if not 0.0 <= self.texture < 1.0:
            raise bad("texture", "must be in [0, 1)")
        if self.acq_matrix < 16:
            raise bad("acq_matrix", "must be >= 16")
        for key in _float_fields():
            if not math.isfinite(getattr(self, key)):
                raise bad(key, "must be finite")

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], source: str = "<dict>", name: str | None = None
    ) -> VendorSpec:
        """Build a vendor from a mapping (e.g. a YAML section) and validate it.

        Keys are the field names, plus ``base`` (a built-in vendor whose values
        the unspecified fields take; default: the dataclass defaults). ``name``
        defaults to the ``name`` argument, else ``"custom"``.

        Raises:
            DataError: unknown key, wrong type or out-of-range value (the message
                names ``source`` and the key).
        """
        if not isinstance(data, Mapping):
            raise DataError(
                f"{source}: a vendor must be a mapping of fields, got {type(data).__name__}"
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = [k for k in data if k not in fields and k != "base"]
        if unknown:
            raise DataError(
                f"{source}: unknown vendor key(s) {sorted(map(str, unknown))}; "
                f"allowed: {['base', *fields]}"
            )
        values: dict[str, Any] = {}
        if "base" in data:
            base = data["base"]
            if not isinstance(base, str) or base not in BUILTIN_VENDORS:
                raise DataError(
                    f"{source}: vendor key 'base' must name a built-in vendor "
                    f"{sorted(BUILTIN_VENDORS)}, got {base!r}"
                )
            values = dataclasses.asdict(BUILTIN_VENDORS[base])
            values.pop("name")
            values.pop("description")
        for key, value in data.items():
            if key == "base":
                continue
            values[key] = _coerce(key, value, fields[key].type, source)
        values.setdefault("name", name or "custom")
        spec = cls(**values)
        spec.validate(source)
        return spec

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain mapping (``from_dict`` round-trips it)."""
        return dataclasses.asdict(self)


def _float_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(VendorSpec) if f.type in ("float", float)]


def _coerce(key: str, value: Any, typ: Any, source: str) -> Any:
    """Check and convert one vendor value to its field type."""
    typ = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    if typ == "bool":
        if not isinstance(value, bool):
            raise DataError(f"{source}: vendor key '{key}' must be true or false, got {value!r}")
        return value
    if typ == "str":
        if not isinstance(value, str):
            raise DataError(f"{source}: vendor key '{key}' must be a string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{source}: vendor key '{key}' must be a number, got {value!r}")
    if typ == "int":
        if isinstance(value, float) and not value.is_integer():
            raise DataError(f"{source}: vendor key '{key}' must be an integer, got {value!r}")
        return int(value)
    return float(value)


BUILTIN_VENDORS: dict[str, VendorSpec] = {
    "A": VendorSpec(
        name="A",
        description="bright blood, dark myocardium, bright fat; low noise, sharp; scale ~300",
        blood=0.85,
        rv_blood=0.82,
        myocardium=0.22,
        tissue=0.30,
        fat=0.95,
        liver=0.30,
        lung=0.04,
        gamma=1.0,
        scale=300.0,
        noise_std=0.025,
        rician=True,
        bias_strength=0.25,
        blur_mm=0.5,
        acq_matrix=224,
        fov_mm=300.0,
        slice_spacing_mm=10.0,
        ghost=0.0,
        texture=0.06,
    ),
    "B": VendorSpec(
        name="B",
        description="strong surface-coil bias, soft contrast curve, large FOV; scale ~3000",
        blood=0.80,
        rv_blood=0.80,
        myocardium=0.26,
        tissue=0.34,
        fat=0.85,
        liver=0.36,
        lung=0.05,
        gamma=0.8,
        scale=3000.0,
        noise_std=0.035,
        rician=True,
        bias_strength=0.45,
        blur_mm=0.4,
        acq_matrix=256,
        fov_mm=340.0,
        slice_spacing_mm=9.0,
        ghost=0.0,
        texture=0.07,
    ),
    "C": VendorSpec(
        name="C",
        description="steeper contrast curve, smoother images, moderate fat; scale ~1500",
        blood=0.90,
        rv_blood=0.86,
        myocardium=0.30,
        tissue=0.36,
        fat=0.72,
        liver=0.28,
        lung=0.06,
        gamma=1.25,
        scale=1500.0,
        noise_std=0.045,
        rician=True,
        bias_strength=0.3,
        blur_mm=1.0,
        acq_matrix=208,
        fov_mm=360.0,
        slice_spacing_mm=10.0,
        ghost=0.0,
        texture=0.06,
    ),
    "D": VendorSpec(
        name="D",
        description=(
            "low blood/myocardium contrast, dark fat, bright liver, coarse acquisition with "
            "ringing, heavy noise and bias, Nyquist ghost, tight FOV; scale ~800"
        ),
        blood=0.86,
        rv_blood=0.78,
        myocardium=0.50,
        tissue=0.34,
        fat=0.46,
        liver=0.60,
        lung=0.10,
        gamma=0.9,
        scale=800.0,
        noise_std=0.05,
        rician=True,
        bias_strength=0.45,
        blur_mm=1.2,
        acq_matrix=128,
        fov_mm=260.0,
        slice_spacing_mm=8.0,
        ghost=0.08,
        texture=0.1,
    ),
}
"""Built-in vendors ``A``-``D``; ``D`` is the most different."""


def load_vendors(path: str | Path) -> dict[str, VendorSpec]:
    """Read custom vendors from a YAML file.

    The file holds either one vendor (a mapping of fields; ``name`` defaults
    to the file stem), a mapping ``name -> fields``, or ``vendors: {name: fields}``.

    Returns:
        Vendors by name.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: vendor file does not exist") from None
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, Mapping) or not data:
        raise DataError(f"{path}: a vendor file must hold a non-empty mapping")
    if set(data) == {"vendors"}:
        data = data["vendors"]
        if not isinstance(data, Mapping) or not data:
            raise DataError(f"{path}: 'vendors' must be a non-empty mapping of name -> fields")
    if all(isinstance(v, Mapping) for v in data.values()):
        out = {}
        for key, fields in data.items():
            spec = VendorSpec.from_dict(fields, source=f"{path} [{key}]", name=str(key))
            out[spec.name] = spec
        return out
    spec = VendorSpec.from_dict(data, source=str(path), name=path.stem)
    return {spec.name: spec}


def get_vendor(name_or_spec: str | VendorSpec | Mapping[str, Any]) -> VendorSpec:
    """Resolve a vendor: a built-in name, a YAML file of one vendor, a mapping, or a spec."""
    if isinstance(name_or_spec, VendorSpec):
        name_or_spec.validate()
        return name_or_spec
    if isinstance(name_or_spec, Mapping):
        return VendorSpec.from_dict(name_or_spec, source="<vendor mapping>")
    if isinstance(name_or_spec, (str, Path)):
        key = str(name_or_spec)
        if key in BUILTIN_VENDORS:
            return BUILTIN_VENDORS[key]
        if key.endswith((".yaml", ".yml")):
            vendors = load_vendors(key)
            if len(vendors) != 1:
                raise DataError(f"{key}: expected one vendor, found {sorted(vendors)}")
            return next(iter(vendors.values()))
        raise DataError(f"unknown synthetic vendor {key!r}; built-in: {sorted(BUILTIN_VENDORS)}")
    raise DataError(
        f"a vendor must be a name, mapping or VendorSpec, got {type(name_or_spec).__name__}"
    )


# --------------------------------------------------------------------------- anatomy


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


# --------------------------------------------------------------------------- geometry


def _ellipse_sd(
    x: np.ndarray,
    y: np.ndarray,
    cx: np.ndarray | float,
    cy: np.ndarray | float,
    a: np.ndarray | float,
    b: np.ndarray | float,
    rot: np.ndarray | float = 0.0,
    wobble: np.ndarray | None = None,
) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to a rotated ellipse.

    ``x``, ``y`` are ``(1, H, W)`` grids in mm; the parameters broadcast as
    ``(Z, 1, 1)`` arrays or scalars. ``wobble`` ``(K, 2)`` (amplitude, phase)
    perturbs the radius by harmonics ``2..K+1`` of the polar angle. Absent
    ellipses (a semi-axis <= 0) give a large positive distance.

    Returns:
        ``(Z, H, W)`` float32.
    """
    f32 = np.float32
    a = np.asarray(a, dtype=f32)
    b = np.asarray(b, dtype=f32)
    present = (a > 0.05) & (b > 0.05)
    a = np.maximum(a, f32(0.05))
    b = np.maximum(b, f32(0.05))
    dx = x - np.asarray(cx, dtype=f32)
    dy = y - np.asarray(cy, dtype=f32)
    if wobble is None and np.array_equal(a, b):
        sd = np.sqrt(dx * dx + dy * dy) - a  # circle: exact
        return np.where(present, sd, f32(1e4))
    rot = np.asarray(rot, dtype=f32)
    cos, sin = np.cos(rot), np.sin(rot)
    u = dx * cos + dy * sin
    v = dy * cos - dx * sin
    ua, vb = u / a, v / b
    rho = np.sqrt(ua * ua + vb * vb) + f32(1e-6)
    if wobble is not None and len(wobble):
        theta = np.arctan2(v, u)
        mod = np.ones_like(rho)
        for k, (amp, phase) in enumerate(wobble, start=2):
            mod += f32(amp) * np.cos(k * theta + f32(phase))
        rho = rho / mod
    grad = np.sqrt((ua / a) ** 2 + (vb / b) ** 2) / rho + f32(1e-6)
    sd = (rho - f32(1.0)) / grad
    return np.where(present, sd, f32(1e4))


def _coverage(sd: np.ndarray, px: float) -> np.ndarray:
    """Partial-volume fraction of a pixel of side ``px`` mm at signed distance ``sd``."""
    return np.clip(0.5 - sd / px, 0.0, 1.0)


def _paint(img: np.ndarray, alpha: np.ndarray, value: np.ndarray | float) -> None:
    """Composite ``value`` over ``img`` in place with coverage ``alpha``."""
    img += alpha * (value - img)


def _gaussian_lowpass(shape: tuple[int, int], px: float, sigma_mm: float) -> np.ndarray:
    """Gaussian transfer function ``(H, W)`` for a blur of ``sigma_mm`` at pixel size ``px``."""
    fy = np.fft.fftfreq(shape[0], d=px)[:, None]
    fx = np.fft.fftfreq(shape[1], d=px)[None, :]
    return np.exp(-2.0 * (np.pi * sigma_mm) ** 2 * (fx * fx + fy * fy))


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int, int], px: float, sigma_mm: float
) -> np.ndarray:
    """Smooth random field ``(Z, H, W)`` float32 with unit standard deviation per slice."""
    white = rng.standard_normal(shape).astype(np.float32)
    spec = np.fft.rfft2(white) * _gaussian_lowpass(shape[1:], px, sigma_mm)[:, : shape[2] // 2 + 1]
    field_ = np.fft.irfft2(spec, s=shape[1:]).astype(np.float32)
    field_ -= field_.mean(axis=(1, 2), keepdims=True)
    field_ /= field_.std(axis=(1, 2), keepdims=True) + 1e-6
    return field_


# --------------------------------------------------------------------------- rendering


def _render(
    anat: _Anatomy,
    spec: VendorSpec,
    phase: str,
    size: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one case-phase.

    Returns:
        image ``(H, W, Z)`` float32 and mask ``(H, W, Z)`` int64.
    """
    px = spec.fov_mm / size
    pos = _slice_positions(anat, spec.slice_spacing_mm)
    nz = pos.size
    coords = (np.arange(size, dtype=np.float32) - (size - 1) / 2.0) * np.float32(px)
    y = coords[None, :, None]  # rows: anterior (top) -> posterior
    x = coords[None, None, :]  # columns: image left (patient right) -> image right

    def col(values: np.ndarray | float) -> np.ndarray:
        return np.broadcast_to(np.asarray(values, dtype=np.float32), (nz,)).reshape(nz, 1, 1)

    es = phase == "ES"
    # Long-axis geometry: the apex is fixed, the base descends at ES.
    length = anat.length * (1.0 - anat.es_short) if es else anat.length
    base = anat.length - length
    z = (pos - base) / length  # 0 base, 1 apex
    heart = (z >= -0.02) & (z < 1.0)
    atrial = z < -0.02
    zc = np.clip(z, 0.0, 1.0)

    r_endo0 = anat.r_endo * (anat.es_endo if es else 1.0)
    wall0 = anat.wall * (anat.es_wall if es else 1.0)
    r_epi0 = r_endo0 + wall0
    r_epi = np.where(heart, r_epi0 * np.sqrt(np.clip(1.0 - zc**2.2, 0.0, None)), 0.0)
    wall_z = wall0 * (1.0 - 0.2 * zc)
    r_endo = np.clip(r_epi - wall_z, 0.0, None)
    r_endo = np.where(r_endo > 1.0, r_endo, 0.0)

    shift = (1.0 if es else 0.0) * rng.normal(0.0, 1.0, 2)
    cx = anat.heart_c[0] + anat.heart_drift[0] * zc + shift[0]
    cy = anat.heart_c[1] + anat.heart_drift[1] * zc + shift[1]
    rot = anat.rot + (0.05 if es else 0.0)
    e = anat.ellip

    # RV: an ellipse beside the LV, minus the LV epicardium -> a crescent.
    s_rv = np.sqrt(np.clip(1.0 - (zc / anat.rv_extent) ** 2, 0.0, None)) * heart
    rv_size = (anat.r_endo + anat.wall) * (anat.es_rv if es else 1.0)
    rv_r = anat.rv_radial * rv_size * s_rv
    rv_t = anat.rv_tangent * rv_size * s_rv**0.6
    rv_ang = anat.rv_angle + rot
    rv_d = anat.rv_dist * r_epi + 0.2 * r_epi0 * (1.0 - s_rv)
    rvx = cx + rv_d * np.cos(rv_ang)
    rvy = cy + rv_d * np.sin(rv_ang)

    # ---------------- background anatomy
    img = np.zeros((nz, size, size), dtype=np.float32)
    bx, by = anat.body_c
    ax_, ay_ = anat.body_ax
    sd_body = _ellipse_sd(x, y, bx, by, ax_, ay_, anat.body_rot, anat.body_wobble)
    _paint(img, _coverage(sd_body, px), spec.fat)
    _paint(img, _coverage(sd_body + anat.fat_t, px), spec.tissue)
    inner = anat.fat_t + anat.muscle_t
    _paint(img, _coverage(sd_body + inner, px), 0.8 * spec.tissue + 0.2 * spec.fat)

    # Lungs shrink toward the diaphragm (apical slices); vessels inside.
    lung_s = col(1.0 - 0.35 * zc)
    lungs = [
        (bx - 0.50 * ax_, by - 0.2 * ay_, 0.30 * ax_ * anat.lung_scale[0], 0.52 * ay_, 0.35),
        (bx + 0.50 * ax_, by - 0.15 * ay_, 0.28 * ax_ * anat.lung_scale[1], 0.50 * ay_, -0.35),
    ]
    lung_alpha = []
    for (lx, ly, la, lb, lr), wob in zip(lungs, anat.lung_wobble):
        a = _coverage(_ellipse_sd(x, y, lx, ly, la * lung_s, lb * lung_s, lr, wob), px)
        _paint(img, a, spec.lung)
        lung_alpha.append(a)
    sd_vessels = np.full((1, size, size), 1e4, dtype=np.float32)
    for li, frac, ang, rad in anat.vessels:
        lx, ly, la, lb, _ = lungs[int(li)]
        vx = lx + frac * la * 0.7 * math.cos(ang)
        vy = ly + frac * lb * 0.7 * math.sin(ang)
        np.minimum(sd_vessels, _ellipse_sd(x, y, vx, vy, rad, rad), out=sd_vessels)
    _paint(img, _coverage(sd_vessels, px) * np.maximum(*lung_alpha), 0.7 * spec.blood)

    # Liver rises into view toward the apex; stomach on the other side.
    liver_y = by + 0.62 * ay_ - 45.0 * zc + anat.liver_shift
    sd_liver = _ellipse_sd(x, y, bx - 0.28 * ax_, col(liver_y), 0.55 * ax_, 0.42 * ay_, 0.25)
    _paint(img, _coverage(sd_liver + anat.fat_t + 2.0, px), spec.liver)
    st_s = col(np.clip(zc * 1.6 - 0.3, 0.0, 1.0))
    stomach_val = anat.stomach_w * 0.9 * spec.blood + (1.0 - anat.stomach_w) * spec.tissue
    sd_st = _ellipse_sd(
        x,
        y,
        bx + 0.42 * ax_,
        by + 0.25 * ay_,
        anat.stomach_ax[0] * st_s,
        anat.stomach_ax[1] * st_s,
        0.3,
    )
    _paint(img, _coverage(sd_st, px), stomach_val)

    # Spine (vertebral body with a dark cortical rim) and descending aorta.
    sx_, sy_ = bx, by + 0.72 * ay_
    sd_spine = _ellipse_sd(x, y, sx_, sy_, 17.0, 15.0)
    _paint(img, _coverage(sd_spine, px), 0.5 * spec.lung + 0.1 * spec.tissue)
    _paint(img, _coverage(sd_spine + 2.0, px), 0.8 * spec.tissue + 0.2 * spec.fat)
    _paint(
        img,
        _coverage(_ellipse_sd(x, y, sx_ + 22.0, sy_ - 24.0, anat.aorta_r, anat.aorta_r), px),
        spec.blood,
    )

    # Atria and aortic root on slices above the base (blood pools, unlabelled).
    at = col(atrial.astype(np.float32))
    if atrial.any():
        _paint(
            img,
            _coverage(_ellipse_sd(x, y, col(cx + 12.0), col(cy + 18.0), 22.0 * at, 17.0 * at), px),
            spec.blood,
        )
        _paint(
            img,
            _coverage(_ellipse_sd(x, y, col(cx - 30.0), col(cy + 2.0), 18.0 * at, 22.0 * at), px),
            spec.rv_blood,
        )
        sd_ao = _ellipse_sd(x, y, col(cx - 4.0), col(cy - 8.0), 13.0 * at, 13.0 * at)
        _paint(img, _coverage(sd_ao - 2.0, px), spec.myocardium)
        _paint(img, _coverage(sd_ao, px), spec.blood)

    # ---------------- heart
    sd_epi = _ellipse_sd(x, y, col(cx), col(cy), col(r_epi * (1 + e)), col(r_epi * (1 - e)), rot)
    sd_endo = _ellipse_sd(
        x, y, col(cx), col(cy), col(r_endo * (1 + e)), col(r_endo * (1 - e)), rot, anat.endo_wobble
    )
    sd_rv = _ellipse_sd(x, y, col(rvx), col(rvy), col(rv_r), col(rv_t), col(rv_ang), anat.rv_wobble)

    # Epicardial fat along part of the heart's outline.
    theta = np.arctan2(y - col(cy), x - col(cx))
    fat_t = anat.epi_fat_t * (0.5 + 0.5 * np.cos(theta - anat.epi_fat_angle)) ** 2
    sd_heart = np.minimum(sd_epi, sd_rv - anat.rv_wall)
    _paint(img, _coverage(sd_heart - fat_t, px), spec.fat)
    _paint(img, _coverage(sd_rv - anat.rv_wall, px), spec.myocardium)
    _paint(img, _coverage(sd_rv, px), spec.rv_blood)
    _paint(img, _coverage(sd_epi, px), spec.myocardium)
    _paint(img, _coverage(sd_endo, px), spec.blood)

    # Papillary muscles inside the LV cavity (labelled LV, as in M&Ms).
    pap = np.sin(np.pi * np.clip((zc - 0.15) / 0.7, 0.0, 1.0)) * heart
    pap_r = r_endo * (0.28 if es else 0.17) * pap
    for ang in anat.pap_angles:
        a_ = anat.rv_angle + np.pi + ang + rot
        px_c = cx + 0.62 * r_endo * np.cos(a_)
        py_c = cy + 0.62 * r_endo * np.sin(a_)
        sd_p = _ellipse_sd(x, y, col(px_c), col(py_c), col(pap_r), col(pap_r * 0.8), a_)
        _paint(img, _coverage(sd_p, px) * _coverage(sd_endo, px), spec.myocardium)

    mask = np.zeros((nz, size, size), dtype=np.int64)
    mask[(sd_rv < 0) & (sd_epi >= 0)] = 3
    mask[sd_epi < 0] = 2
    mask[sd_endo < 0] = 1

    # ---------------- appearance
    shape = img.shape
    img *= 1.0 + spec.texture * _smooth_noise(rng, shape, px, 5.0)
    img = np.clip(img, 0.0, None) ** np.float32(spec.gamma)

    # Coil bias: smooth log-intensity field, mostly a gradient in a random direction.
    half = spec.fov_mm / 2.0
    g = rng.normal(0.0, 1.0, 3)
    bias = (g[0] * x + g[1] * y) / half + 0.5 * g[2] * ((x * x + y * y) / half**2 - 0.5)
    bias = bias / (np.linalg.norm(g) + 1e-6) + 0.3 * _smooth_noise(rng, (1, size, size), px, 40.0)
    img *= np.exp(np.float32(spec.bias_strength) * bias).astype(np.float32)

    if spec.ghost > 0:
        img += np.float32(spec.ghost) * np.roll(img, size // 2, axis=1)

    # Acquisition: k-space truncation to the acquired resolution, reconstruction blur,
    # complex noise added in k-space (so band-limited like the signal), magnitude.
    fy = np.fft.fftfreq(size, d=px)[:, None]
    fx = np.fft.fftfreq(size, d=px)[None, :]
    kmax = 0.5 / spec.resolution_mm
    transfer = ((np.abs(fx) <= kmax) & (np.abs(fy) <= kmax)).astype(np.float32)
    if spec.blur_mm > 0:
        transfer = transfer * _gaussian_lowpass((size, size), px, spec.blur_mm).astype(np.float32)
    noise_gain = 1.0 / math.sqrt(float(np.mean(transfer**2)) + 1e-12)
    kspace = np.fft.fft2(img)
    sigma = spec.noise_std * noise_gain * size  # per-pixel image-domain std = noise_std
    noise = rng.standard_normal((2, *shape)).astype(np.float32)
    kspace = (kspace + sigma * (noise[0] + 1j * noise[1])) * transfer
    recon = np.fft.ifft2(kspace)
    if spec.rician:
        out = np.abs(recon)
    else:
        out = recon.real
    scale = spec.scale * rng.uniform(0.85, 1.2)
    out = (out * scale).astype(np.float32)

    return np.ascontiguousarray(np.moveaxis(out, 0, -1)), np.ascontiguousarray(
        np.moveaxis(mask, 0, -1)
    )


# --------------------------------------------------------------------------- public API


def _seed_words(seed: int, vendor: str, *rest: int) -> list[int]:
    """Entropy words for numpy's SeedSequence: seed, a stable hash of the vendor, extras."""
    s = int(seed) % (1 << 64)
    return [s & 0xFFFFFFFF, s >> 32, zlib.crc32(vendor.encode("utf-8")), *rest]


def generate_volumes(
    vendor: str | VendorSpec | Mapping[str, Any],
    num_cases: int,
    seed: int,
    size: int = 128,
    phases: tuple[str, ...] = PHASES,
    case_prefix: str | None = None,
) -> list[Volume]:
    """Generate synthetic cases of one vendor.

    Args:
        vendor: built-in vendor name, a :class:`VendorSpec`, or a mapping of its fields.
        num_cases: number of cases (patients).
        seed: generator seed; the vendor name is mixed in, so vendors never
            share anatomy.
        size: matrix side in pixels; spacing is ``fov_mm / size``.
        phases: phases to render per case, from ``("ED", "ES")``.
        case_prefix: case name prefix (default ``"syn"``): cases are
            ``f"{prefix}{vendor}{i:03d}"``.

    Returns:
        One :class:`Volume` per (case, phase), case-major: image ``(H, W, Z)``
        float32 with ``H = W = size``, mask ``(H, W, Z)`` int64 labels 0..3,
        spacing ``(fov/size, fov/size, slice_spacing)`` mm. The same arguments
        give identical arrays.
    """
    spec = get_vendor(vendor)
    if isinstance(num_cases, bool) or not isinstance(num_cases, (int, np.integer)) or num_cases < 0:
        raise DataError(f"num_cases must be a non-negative integer, got {num_cases!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 16:
        raise DataError(f"size must be an integer >= 16, got {size!r}")
    phases = tuple(phases)
    bad = [p for p in phases if p not in PHASES]
    if bad or not phases or len(set(phases)) != len(phases):
        raise DataError(f"phases must be distinct values from {PHASES}, got {phases}")
    prefix = DEFAULT_CASE_PREFIX if case_prefix is None else case_prefix
    px = spec.fov_mm / size
    spacing = (float(px), float(px), float(spec.slice_spacing_mm))
    volumes: list[Volume] = []
    for i in range(int(num_cases)):
        anat = _sample_anatomy(np.random.default_rng(_seed_words(seed, spec.name, i, 0)))
        case = f"{prefix}{spec.name}{i:03d}"
        for phase in phases:
            rng = np.random.default_rng(_seed_words(seed, spec.name, i, 1 + PHASES.index(phase)))
            image, mask = _render(anat, spec, phase, int(size), rng)
            volumes.append(
                Volume(
                    image=image,
                    mask=mask,
                    spacing=spacing,
                    case=case,
                    phase=phase,
                    vendor=spec.name,
                    centre=spec.name,
                    source=f"synthetic:{spec.name}",
                )
            )
    log.debug(
        "generated %d synthetic volumes of vendor %s (seed %d, size %d)",
        len(volumes),
        spec.name,
        seed,
        size,
    )
    return volumes


def write_dataset(
    out_dir: str | Path,
    vendors: Sequence[str | VendorSpec],
    num_cases: int,
    seed: int,
    size: int = 128,
) -> Path:
    """Write synthetic cases of several vendors as NIfTI files plus a manifest.

    Files: ``<case>_<phase>.nii.gz`` (float32 image) and
    ``<case>_<phase>_gt.nii.gz`` (uint8 labels), affine ``diag(sx, sy, sz, 1)``;
    ``manifest.csv`` with header ``case,phase,vendor,centre,image,mask`` and
    paths relative to ``out_dir``, written atomically.

    Returns:
        The manifest path.
    """
    import nibabel as nib

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    for vendor in vendors:
        for vol in generate_volumes(vendor, num_cases, seed, size=size):
            affine = np.diag([*vol.spacing, 1.0])
            image_name = f"{vol.key}.nii.gz"
            mask_name = f"{vol.key}_gt.nii.gz"
            img = nib.Nifti1Image(vol.image.astype(np.float32), affine)
            img.header.set_zooms(vol.spacing)
            msk = nib.Nifti1Image(vol.mask.astype(np.uint8), affine)
            msk.header.set_zooms(vol.spacing)
            nib.save(img, out / image_name)
            nib.save(msk, out / mask_name)
            rows.append(
                {
                    "case": vol.case,
                    "phase": vol.phase,
                    "vendor": vol.vendor,
                    "centre": vol.centre,
                    "image": image_name,
                    "mask": mask_name,
                }
            )
    manifest = out / "manifest.csv"
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(MANIFEST_HEADER))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(manifest, text.getvalue())
    log.info("wrote %d synthetic volumes to %s", len(rows), out)
    return manifest
