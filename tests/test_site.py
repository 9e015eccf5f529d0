"""Tests of jras_core.site: site YAMLs, slice cache, splits, bank store and local training."""

from __future__ import annotations

import base64
import os
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from bank_sites import site_yaml
from fuzzing import FEW, any_value
from hypothesis import given
from hypothesis import strategies as st
from loader_cases import save_nifti, toy_pair, write_case, write_manifest
from shared_data import SHARED
from tiny_methods import TINY

from jras_core.config import ConfigError, JRASConfig
from jras_core.data.volume import DataError
from jras_core.models.jras import build_model
from jras_core.retrieval.crypto import ENV_VAR, generate_key_file
from jras_core.site import Site, SiteConfig

PROJECT = Path(__file__).resolve().parents[1]

CFG = JRASConfig().with_overrides({"preprocess.size": 32})


def _yaml(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(body)
    return path


def test_site_yaml_validation_names_file_and_key(tmp_path):
    with pytest.raises(ConfigError, match=r"site\.yaml.*unknown key.*colour"):
        SiteConfig.from_yaml(_yaml(tmp_path, "name: a\ncolour: red\n"))
    with pytest.raises(ConfigError, match=r"site\.yaml.*does not exist"):
        SiteConfig.from_yaml(_yaml(tmp_path, "name: a\ndata: {kind: manifest, path: gone.csv}\n"))
    with pytest.raises(ConfigError, match="val_fraction"):
        SiteConfig.from_yaml(_yaml(tmp_path, "name: a\nval_fraction: 1.5\ndata: {kind: synthetic, vendor: A}\n"))


def test_shipped_site_yamls_are_valid():
    sites = Path(__file__).resolve().parents[1] / "sites"
    names = set()
    for path in sorted(sites.glob("*.yaml")):
        if path.name.startswith("template"):
            continue
        if "shared/data/" in path.read_text() and not SHARED.is_dir():
            continue  # a site of the real-data fixtures, which are not beside the project
        names.add(SiteConfig.from_yaml(path).name)
    assert {"synthetic-A", "synthetic-D"} <= names


def _keyed(tmp_path: Path) -> str:
    generate_key_file(tmp_path / "site.key")
    return "key_file: site.key\n"


def test_the_store_is_written_beside_the_yaml_and_reused(tmp_path):
    path = _yaml(tmp_path, _keyed(tmp_path) + "name: s\ncache_dir: cache\n"
                 "data: {kind: synthetic, vendor: B, cases: 3, size: 32}\n")
    first = Site(SiteConfig.from_yaml(path), CFG, root=tmp_path)
    n = len(first.slices)
    files = list((tmp_path / "cache").glob("s.slices-*.enc"))
    assert n > 0 and len(files) == 1
    second = Site(SiteConfig.from_yaml(path), CFG, root=tmp_path)
    assert torch.equal(second.slices.images, first.slices.images)
    # another preprocessing gets other slices, and the stale ones go
    Site(SiteConfig.from_yaml(path), CFG.with_overrides({"preprocess.size": 48}), root=tmp_path).slices
    (now,) = (tmp_path / "cache").glob("s.slices-*.enc")
    assert now != files[0]


def test_slices_stored_before_the_data_changed_are_not_used(tmp_path):
    """The store is keyed by the bytes of the data files: a mask edited to hold label 7 after
    the slices were stored is read again, and its bad label is reported."""
    native = CFG.with_overrides({"preprocess.fov_mm": None})  # the toy cases' native spacing
    image, mask = toy_pair()
    rows = [write_case(tmp_path, f"c{i}", image, mask) for i in range(2)]
    write_manifest(tmp_path, rows)
    path = _yaml(tmp_path, _keyed(tmp_path) + "name: m\ncache_dir: cache\ndata: {kind: manifest, path: manifest.csv}\n")
    site = Site(SiteConfig.from_yaml(path), native, root=tmp_path)
    assert len(site.slices) > 0
    (stored,) = (tmp_path / "cache").glob("m.slices-*.enc")
    assert site.store.path("slices", site._data_digest()) == stored
    edited = mask.copy()
    edited[3, 3, 1] = 7
    save_nifti(tmp_path / rows[1][2], edited)
    site = Site(SiteConfig.from_yaml(path), native, root=tmp_path)
    assert site.store.path("slices", site._data_digest()) != stored
    with pytest.raises(DataError, match=r"c1_gt\.nii\.gz: mask labels \[7\] outside"):
        site.slices  # noqa: B018


def test_a_site_whose_masks_are_all_empty_names_itself_and_its_files(tmp_path):
    image, mask = toy_pair()
    rows = [write_case(tmp_path, f"e{i}", image, mask * 0) for i in range(2)]
    write_manifest(tmp_path, rows)
    path = _yaml(tmp_path, "name: empty\ndata: {kind: manifest, path: manifest.csv}\n")
    with pytest.raises(DataError, match=r"site empty: none of the 2 volume\(s\) has a labelled slice .*e0\.nii\.gz"):
        Site(SiteConfig.from_yaml(path), CFG, root=tmp_path).slices  # noqa: B018


def test_a_site_of_one_case_trains_on_it_and_says_why_it_cannot_evaluate(tmp_path):
    path = _yaml(tmp_path, "name: solo\ndata: {kind: synthetic, vendor: A, cases: 1, size: 32}\n")
    site = Site(SiteConfig.from_yaml(path), CFG, root=tmp_path)
    assert len(site.train_set) == len(site.slices) > 0 and len(site.val_set) == 0
    assert "site solo: no validation cases: the site has 1 case" in site.no_validation
    with pytest.raises(ConfigError, match="site solo: no validation cases: the site has 1 case"):
        site.evaluate(build_model(CFG))
    two = Site(SiteConfig.from_yaml(_yaml(tmp_path, "name: duo\ndata: {kind: synthetic, vendor: A, cases: 2, size: 32}\n")),
               CFG, root=tmp_path)
    assert two.no_validation is None and len(two.val_set) > 0


def test_site_names_are_safe_file_name_parts(tmp_path):
    """A site name becomes part of file names (its slice cache): a path is refused, naming
    the YAML, before anything is written."""
    body = "cache_dir: cache\ndata: {kind: synthetic, vendor: A, cases: 2, size: 32}\n"
    for bad in ("../../../../tmp/x", "a/b", ".hidden", "", "x" * 65, "tab\tname", "caf\u00e9"):
        with pytest.raises(ConfigError, match=r"site\.yaml: name: .*(site name|empty)"):
            SiteConfig.from_yaml(_yaml(tmp_path, yaml.safe_dump({"name": bad}) + body))
    assert not (tmp_path / "cache").exists()
    for good in ("acdc-DCM", "site_1.v2", "A", "x" * 64):
        assert SiteConfig.from_yaml(_yaml(tmp_path, yaml.safe_dump({"name": good}) + body)).name == good


def test_safe_site_name_makes_a_valid_name():
    from jras_core.site import check_site_name, safe_site_name

    for text in ("my manifest", "..hidden", "a/b\\c", "", "ü" * 100):
        assert check_site_name(safe_site_name(text)) == safe_site_name(text)
    assert safe_site_name("acdc-DCM") == "acdc-DCM"


def test_splits_are_by_case_and_support_sites_hold_out():
    site = Site(SiteConfig(name="s", data=_synthetic("C", 5), val_fraction=0.4), CFG)
    train_cases = {site.train_set.cases[c] for c in site.train_set.case_ids.tolist()}
    val_cases = {site.val_set.cases[c] for c in site.val_set.case_ids.tolist()}
    assert train_cases and val_cases and not train_cases & val_cases
    held = Site(SiteConfig(name="h", data=_synthetic("D", 5), support_cases=2), CFG)
    assert len({held.train_set.case_ids[i].item() for i in range(len(held.train_set))}) == 2
    assert len(held.bank) == len(held.train_set)


def _synthetic(vendor, cases):
    from jras_core.data.sources import DataSourceConfig

    return DataSourceConfig(kind="synthetic", vendor=vendor, cases=cases, size=32)


def test_site_yamls_parse():
    from jras_core.site import SiteConfig

    for name in "ABCD":
        cfg = SiteConfig.from_yaml(PROJECT / "sites" / f"synthetic-{name}.yaml")
        assert cfg.data.kind == "synthetic" and cfg.data.vendor == name
    manifest = SHARED / "mnms-sample" / "manifest.csv"
    if manifest.is_file():
        for name in "ABC":
            cfg = SiteConfig.from_yaml(PROJECT / "sites" / f"mnms-{name}.yaml")
            assert cfg.data.kind == "manifest" and cfg.data.vendor == name
    template = yaml.safe_load((PROJECT / "sites" / "template-hospital.yaml").read_text())
    assert {"name", "vendor", "data", "val_fraction"} <= set(template)


@pytest.mark.usefixtures("no_bank_key_env")
def test_site_bank_store_resolves_paths_against_the_yaml(tmp_path, monkeypatch):
    from jras_core.config import JRASConfig

    yaml_path = site_yaml(tmp_path)
    site = Site(SiteConfig.from_yaml(yaml_path), JRASConfig(), yaml_path.parent)
    assert site.key_path == yaml_path.parent / "secrets" / "bank.key"
    assert site.bank_path == yaml_path.parent / "bank"
    generate_key_file(site.key_path)
    store = site.bank_store()
    assert store.encrypted and store.directory == site.bank_path
    other = site.bank_store(tmp_path / "x")  # --out overrides bank_dir, the site's key still applies
    assert other.directory == tmp_path / "x" and other.path.name == "bank.enc"
    plain = Site(SiteConfig.from_yaml(site_yaml(tmp_path / "p", key_file=None)), JRASConfig(), tmp_path / "p" / "site")
    assert not plain.bank_store().encrypted
    monkeypatch.setenv(ENV_VAR, base64.b64encode(os.urandom(32)).decode())
    assert plain.bank_store().encrypted


@pytest.mark.slow
def test_a_round_of_local_training_does_not_depend_on_the_previous_one():
    """The prediction memory lives for one call of ``Site.train``: the same global model
    gives the same local update whatever the site trained before (as after a resume)."""
    from jras_core.data.sources import DataSourceConfig
    from jras_core.site import Site, SiteConfig

    cfg = JRASConfig().with_overrides({**TINY, "retrieval.first_pass": "reuse", "contrastive.steps_per_epoch": 1})

    def site():
        return Site(SiteConfig(name="s", data=DataSourceConfig(kind="synthetic", vendor="B", cases=3, size=32)), cfg)

    start = build_model(cfg).state_dict()
    fresh_site, used_site = site(), site()
    used_site.train(build_model(cfg.with_overrides({"train.seed": 1})), epochs=1)  # an earlier round
    updates = []
    for s in (fresh_site, used_site):
        model = build_model(cfg)
        model.load_state_dict(start)
        s.train(model, epochs=2)
        updates.append(model.state_dict())
    assert all(torch.equal(updates[0][k], updates[1][k]) for k in updates[0])


@FEW
@given(data=st.dictionaries(
    st.sampled_from(["name", "vendor", "val_fraction", "split_seed", "support_cases", "cache_dir", "data", "colour"]),
    st.one_of(any_value, st.dictionaries(
        st.sampled_from(["kind", "path", "vendor", "cases", "seed", "size", "label_map", "skip_bad", "nope"]),
        any_value, max_size=4)),
    max_size=6,
))
def test_site_config_parser_only_raises_config_error(data):
    with tempfile.TemporaryDirectory() as tmp:
        try:
            SiteConfig.from_dict(data, source="site.yaml", root=Path(tmp))
        except ConfigError as exc:
            assert "site.yaml" in str(exc), str(exc)


def test_a_sites_slices_are_held_once(tmp_path):
    """Its training and validation parts are views of the one copy the site keeps."""
    path = _yaml(tmp_path, "name: s\nval_fraction: 0.34\ndata: {kind: synthetic, vendor: B, cases: 3, size: 32}\n")
    site = Site(SiteConfig.from_yaml(path), CFG, root=tmp_path)
    n = len(site.slices)
    train, val = site.train_set, site.val_set
    assert len(train) > 0 and len(val) > 0 and len(train) + len(val) == n == len(site.slices)
    base = site.slices.images.untyped_storage().data_ptr()
    assert {p.images.untyped_storage().data_ptr() for p in (train, val)} == {base}
    assert site.slices.images.untyped_storage().nbytes() == site.slices.images.nbytes
    assert not set(train.case_ids.tolist()) & set(val.case_ids.tolist())
