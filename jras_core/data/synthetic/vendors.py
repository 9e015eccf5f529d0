"""Synthetic scanner vendors: the :class:`VendorSpec` schema, its validation, the
built-in vendors and reading custom vendors from YAML.

A vendor only changes the appearance of the shared anatomy: tissue
intensities, contrast curve, intensity scale, noise (Rician or Gaussian,
band-limited by the acquisition), coil bias field, k-space resolution (with
Gibbs ringing), extra blur, Nyquist ghosting, field of view (so pixel spacing)
and slice spacing. Vendor ``D`` differs most from ``A``-``C``: low
blood/myocardium contrast, dark fat, bright liver, coarse acquisition, strong
noise and bias, ghosting and a tight field of view.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from jras_core.config import check, config_class, validate_as
from jras_core.data.volume import DataError


def _whole(value: Any) -> Any:
    """A whole float (``224.0``) as an int; anything else as it is (for the int check)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Intensity = Annotated[StrictFloat, Field(ge=0.0, le=1.0)]
"""A relative tissue intensity, in [0, 1]."""
Positive = Annotated[StrictFloat, Field(gt=0.0)]
NonNegative = Annotated[StrictFloat, Field(ge=0.0)]


@config_class(frozen=True, error=DataError)
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

    Values are checked when a spec is made (:class:`DataError` naming the key); integers
    are accepted for numbers, and whole numbers for ``acq_matrix``.
    """

    name: Annotated[StrictStr, check(lambda v: bool(v.strip()), "must be a non-empty string")]
    blood: Intensity = 0.85
    rv_blood: Intensity = 0.82
    myocardium: Intensity = 0.22
    tissue: Intensity = 0.30
    fat: Intensity = 0.95
    liver: Intensity = 0.30
    lung: Intensity = 0.04
    gamma: Positive = 1.0
    scale: Positive = 300.0
    noise_std: Annotated[NonNegative, Field(le=1.0)] = 0.025
    rician: StrictBool = True
    bias_strength: Annotated[NonNegative, Field(le=2.0)] = 0.25
    blur_mm: NonNegative = 0.5
    acq_matrix: Annotated[StrictInt, BeforeValidator(_whole), Field(ge=16)] = 224
    fov_mm: Positive = 300.0
    slice_spacing_mm: Positive = 10.0
    ghost: Annotated[StrictFloat, Field(ge=0.0, lt=1.0)] = 0.0
    texture: Annotated[StrictFloat, Field(ge=0.0, lt=1.0)] = 0.06
    description: StrictStr = ""

    @property
    def resolution_mm(self) -> float:
        """Effective acquired in-plane resolution, mm."""
        return self.fov_mm / self.acq_matrix

    def validate(self, source: str = "") -> None:
        """Raise :class:`DataError` naming the first invalid field (values are checked when a
        spec is made; this checks them again)."""
        validate_as(VendorSpec, self.to_dict(), _where(source, self.name), DataError)

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
        values: dict[str, Any] = {}
        where = _where(source, data.get("name", name or "custom"))
        if "base" in data:
            base = data["base"]
            if not isinstance(base, str) or base not in BUILTIN_VENDORS:
                raise DataError(
                    f"{where}: base: must name a built-in vendor {sorted(BUILTIN_VENDORS)}, got {base!r}"
                )
            values = BUILTIN_VENDORS[base].to_dict()
            values.pop("name")
            values.pop("description")
        values.update((key, value) for key, value in data.items() if key != "base")
        values.setdefault("name", name or "custom")
        return validate_as(cls, values, where, DataError)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain mapping (``from_dict`` round-trips it)."""
        return dataclasses.asdict(self)


def _where(source: str, name: Any) -> str:
    """What a vendor's errors name first: ``site.yaml: vendor 'X'``."""
    return f"{source}: vendor {name!r}" if source else f"vendor {name!r}"


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
