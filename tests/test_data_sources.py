"""Tests of jras_core.data.sources: data source configs and their dispatch to the readers."""

from __future__ import annotations

import sys
import types

import pytest
from loader_cases import (
    BUSI,
    group_manifest,
    header_only_nifti,
    needs_busi,
    toy_pair,
    write_case,
    write_manifest,
)

from jras_core.config import ConfigError
from jras_core.data import DataError, DataSourceConfig, load_volumes


def test_site_yaml_filter_errors_name_yaml_and_manifest(tmp_path):
    from jras_core.site import SiteConfig

    manifest = group_manifest(tmp_path)
    site = tmp_path / "site.yaml"
    body = "name: s\ndata:\n  kind: manifest\n  path: group_manifest.csv\n  {}\n"
    site.write_text(body.format("where: {grp: X}"))
    with pytest.raises(ConfigError, match="unknown column 'grp'") as info:
        SiteConfig.from_yaml(site)
    assert str(site) in str(info.value) and str(manifest) in str(info.value)
    site.write_text(body.format("where: {group: X}\n  exclude: {case: [c1, c2]}"))
    with pytest.raises(ConfigError, match="keep no row") as info:
        SiteConfig.from_yaml(site)
    assert str(site) in str(info.value) and str(manifest) in str(info.value)
    site.write_text(body.format("where: {group: NO}"))
    with pytest.raises(ConfigError, match="YAML boolean"):
        SiteConfig.from_yaml(site)
    site.write_text(body.format("where: {group: Y}\n  vendor: A"))
    cfg = SiteConfig.from_yaml(site)
    assert [v.case for v in load_volumes(cfg.data, 4, tmp_path)] == ["c3"]


def test_row_filters_are_for_manifests_only(tmp_path):
    with pytest.raises(ConfigError, match="where.*kind 'synthetic'"):
        DataSourceConfig.from_dict({"kind": "synthetic", "vendor": "A", "where": {"case": "x"}})
    with pytest.raises(ConfigError, match="exclude.*kind 'folder'"):
        DataSourceConfig.from_dict({"kind": "folder", "path": str(tmp_path), "exclude": {"case": "x"}})
    for bad in ({}, ["group"], {"group": None}, {"group": [["X"]]}):
        with pytest.raises(ConfigError, match="where"):
            DataSourceConfig.from_dict({"kind": "manifest", "path": "x.csv", "where": bad})


def test_source_config_validation(tmp_path):
    with pytest.raises(ConfigError, match="needs 'path'"):
        DataSourceConfig.from_dict({"kind": "manifest"})
    with pytest.raises(ConfigError, match="does not exist"):
        DataSourceConfig.from_dict({"kind": "folder", "path": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="info_csv"):
        DataSourceConfig.from_dict({"kind": "mnms", "path": str(tmp_path)})
    with pytest.raises(ConfigError, match="vendor"):
        DataSourceConfig.from_dict({"kind": "synthetic"})
    with pytest.raises(ConfigError, match="kind"):
        DataSourceConfig.from_dict({"kind": "dicom", "path": str(tmp_path)})
    with pytest.raises(ConfigError, match="unknown key"):
        DataSourceConfig.from_dict({"kind": "synthetic", "vendor": "A", "colour": 1})
    with pytest.raises(ConfigError, match="label_map"):
        DataSourceConfig.from_dict({"kind": "synthetic", "vendor": "A", "label_map": {"x": 1}})
    cfg = DataSourceConfig.from_dict({"kind": "synthetic", "vendor": "A", "label_map": {"1": 3}})
    assert cfg.label_mapping() == {1: 3}


def test_load_volumes_dispatch(tmp_path, acdc_root):
    image, mask = toy_pair()
    (tmp_path / "site").mkdir()
    write_manifest(tmp_path / "site", [write_case(tmp_path / "site", "c1", image, mask)])
    src = DataSourceConfig(kind="manifest", path="site/manifest.csv")
    with pytest.raises(ConfigError):
        load_volumes(src, 4, root=tmp_path / "elsewhere")
    assert [v.case for v in load_volumes(src, 4, root=tmp_path)] == ["c1"]
    acdc = load_volumes(DataSourceConfig(kind="acdc", path=str(acdc_root), vendor="S"), 4)
    assert {v.vendor for v in acdc} == {"S"} and (acdc[0].mask[0:2] == 3).all()
    keep = load_volumes(DataSourceConfig(kind="acdc", path=str(acdc_root), label_map={}), 4)
    assert (keep[0].mask[0:2] == 1).all()


def test_load_volumes_synthetic_dispatch(monkeypatch):
    calls = []

    def generate_volumes(vendor, num_cases, seed, size=128, **_):
        calls.append((vendor, num_cases, seed, size))
        return []

    fake = types.ModuleType("jras_core.data.synthetic")
    fake.generate_volumes = generate_volumes
    monkeypatch.setitem(sys.modules, "jras_core.data.synthetic", fake)
    load_volumes(DataSourceConfig(kind="synthetic", vendor="B", cases=3, seed=7, size=64), 4)
    load_volumes(DataSourceConfig(kind="synthetic", vendor="B", vendor_spec={"noise": 0.1}), 4)
    assert calls == [("B", 3, 7, 64), ({"noise": 0.1}, 20, 0, 128)]


@needs_busi
def test_load_volumes_folder():
    vols = load_volumes(DataSourceConfig(kind="folder", path=str(BUSI), vendor="busi"), 2)
    assert len(vols) == 40 and vols[0].vendor == "busi"


def test_max_volume_mib_of_a_site_yaml_limits_what_is_read(tmp_path):
    big = header_only_nifti(tmp_path / "big.nii.gz", (1024, 1024, 80))  # 640 MiB as float64
    manifest = write_manifest(tmp_path, [("big", big.name, big.name)])
    with pytest.raises(DataError, match=r"big\.nii\.gz: header declares 1024 x 1024 x 80 .*limit of 512\.0 MiB"):
        load_volumes(DataSourceConfig(kind="manifest", path=str(manifest)), 4)
    with pytest.raises(DataError, match=r"big\.nii\.gz: header declares .*limit of 100\.0 MiB"):
        load_volumes(DataSourceConfig(kind="manifest", path=str(manifest), max_volume_mib=100), 4)
    with pytest.raises(ConfigError, match="max_volume_mib"):
        DataSourceConfig.from_dict({"kind": "manifest", "path": str(manifest), "max_volume_mib": 0})
