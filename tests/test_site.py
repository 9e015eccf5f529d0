from pathlib import Path

import pytest
import torch
from shared_data import SHARED

from jras_core.config import ConfigError, JRASConfig
from jras_core.site import Site, SiteConfig

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


def test_cache_is_written_beside_the_yaml_and_reused(tmp_path):
    path = _yaml(tmp_path, "name: s\ncache_dir: cache\ndata: {kind: synthetic, vendor: B, cases: 3, size: 32}\n")
    first = Site(SiteConfig.from_yaml(path), CFG, root=tmp_path)
    n = len(first.slices)
    files = list((tmp_path / "cache").glob("s-*.pt"))
    assert n > 0 and len(files) == 1
    second = Site(SiteConfig.from_yaml(path), CFG, root=tmp_path)
    assert torch.equal(second.slices.images, first.slices.images)
    # another preprocessing gets another cache entry, never a stale one
    Site(SiteConfig.from_yaml(path), CFG.with_overrides({"preprocess.size": 48}), root=tmp_path).slices
    assert len(list((tmp_path / "cache").glob("s-*.pt"))) == 2


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
