"""Tests of jras_core.data.synthetic.vendors: custom vendor specs and their errors."""

from __future__ import annotations

import pytest
import yaml

from jras_core.data.synthetic import (
    BUILTIN_VENDORS,
    VendorSpec,
    generate_volumes,
    get_vendor,
    load_vendors,
)
from jras_core.data.volume import DataError


def test_custom_vendor_yaml_accepted(tmp_path):
    path = tmp_path / "vendors.yaml"
    path.write_text(
        yaml.safe_dump(
            {"vendors": {"E": {"base": "C", "myocardium": 0.5, "fov_mm": 280, "rician": False}}}
        )
    )
    vendors = load_vendors(path)
    assert list(vendors) == ["E"]
    spec = vendors["E"]
    assert spec.myocardium == 0.5 and spec.fov_mm == 280.0 and spec.rician is False
    assert spec.blood == BUILTIN_VENDORS["C"].blood  # inherited from the base
    vols = generate_volumes(spec, 1, 0, size=32, phases=("ED",))
    assert vols[0].vendor == "E" and vols[0].case == "synE000"
    assert vols[0].spacing[0] == pytest.approx(280.0 / 32)

    single = tmp_path / "F.yaml"
    single.write_text(yaml.safe_dump({"gamma": 1.3, "scale": 1000}))
    spec_f = get_vendor(str(single))
    assert spec_f.name == "F" and spec_f.gamma == 1.3


def test_vendor_mapping_passed_directly():
    vols = generate_volumes({"name": "G", "noise_std": 0.1}, 1, 0, size=32, phases=("ED",))
    assert vols[0].vendor == "G" and vols[0].source == "synthetic:G"


@pytest.mark.parametrize(
    "data, key",
    [
        ({"name": "X", "contrast": 1.0}, "contrast"),
        ({"name": "X", "noise_std": -0.1}, "noise_std"),
        ({"name": "X", "gamma": "steep"}, "gamma"),
        ({"name": "X", "blood": 1.5}, "blood"),
        ({"name": "X", "rician": 1}, "rician"),
        ({"name": "X", "acq_matrix": 96.5}, "acq_matrix"),
        ({"name": "X", "base": "Z"}, "base"),
    ],
)
def test_bad_vendor_keys_rejected(data, key):
    with pytest.raises(DataError, match=key):
        VendorSpec.from_dict(data, source="site.yaml")


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: H\nbloood: 0.8\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*bloood"):
        load_vendors(path)
