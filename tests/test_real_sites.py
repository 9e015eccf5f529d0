"""The real federation's site YAMLs: ACDC by pathology group, at random, its test site, and
the unseen vendors and sequence. They validate, select the right patients, and load."""

from __future__ import annotations

from pathlib import Path

import pytest
from shared_data import needs

from jras_core.config import JRASConfig
from jras_core.data.loaders import select_manifest_rows
from jras_core.site import Site, SiteConfig

SITES = Path(__file__).resolve().parents[1] / "sites"
pytestmark = needs()

GROUPS = {"DCM": 1, "HCM": 21, "MINF": 41, "NOR": 61, "RV": 81}
RANDOM = [f"acdc-random-{k}" for k in range(1, 6)]
UNSEEN = {"unseen-mnms-B": (2, 1), "unseen-mnms-C": (2, 1), "unseen-lge": (15, 5)}
"""Unseen site: (patients, support cases)."""

CFG = JRASConfig().with_overrides({"preprocess.size": 64, "preprocess.fov_mm": None})
"""Small slices at native spacing: these tests count cases, and resampling is the slow part."""


def patient(n: int) -> str:
    return f"patient{n:03d}"


def config(name: str) -> SiteConfig:
    return SiteConfig.from_yaml(SITES / f"{name}.yaml")


def rows(name: str) -> list[dict[str, str]]:
    """The manifest rows a site YAML selects (no image is read)."""
    cfg = config(name)
    where, exclude = cfg.data.row_filters()
    path = cfg.data.resolve(cfg.data.path, SITES)
    vendors = [cfg.data.vendor] if cfg.data.vendor else None
    return [r for _, r in select_manifest_rows(path, vendors, where, exclude)]


def cases(name: str) -> set[str]:
    return {r["case"] for r in rows(name)}


def site_cases(slices) -> set[str]:
    return {slices.cases[i] for i in slices.case_ids.tolist()}


@pytest.mark.parametrize(
    "name", [f"acdc-{g}" for g in GROUPS] + ["acdc-test", *RANDOM, *UNSEEN]
)
def test_site_yaml_validates_and_selects(name):
    cfg = config(name)
    assert cfg.name == name
    assert (SITES / f"{name}.yaml").read_text().startswith("# ")
    selected = rows(name)
    n = len({r["case"] for r in selected})
    if name in UNSEEN:
        assert (n, cfg.support_cases) == UNSEEN[name]
    elif name == "acdc-test":
        assert (n, cfg.support_cases) == (20, 4)
    else:
        assert n == 16 and cfg.support_cases is None and cfg.val_fraction == 0.25
    phases = {(r["case"], r["phase"]) for r in selected}
    assert len(phases) == len(selected) == (n if name == "unseen-lge" else 2 * n)


def test_group_sites_and_test_site_partition_acdc():
    test = cases("acdc-test")
    seen = set(test)
    for group, first in GROUPS.items():
        site = cases(f"acdc-{group}")
        assert site == {patient(first + i) for i in range(16)}
        assert {r["group"] for r in rows(f"acdc-{group}")} == {group}
        assert {patient(first + i) for i in range(16, 20)} <= test
        assert not site & seen
        seen |= site
    assert len(test) == 20
    assert seen == {patient(n) for n in range(1, 101)}


def test_random_split_partitions_the_training_patients():
    training = set().union(*(cases(f"acdc-{g}") for g in GROUPS))
    seen: set[str] = set()
    for name in RANDOM:
        site = cases(name)
        assert len(site) == 16 and not site & seen
        seen |= site
    assert seen == training and len(training) == 80
    # at random, not by group: no random site is one pathology
    assert all(len({r["group"] for r in rows(name)}) > 1 for name in RANDOM)


def test_unseen_sites_are_the_right_vendor_and_sequence():
    assert {r["vendor"] for r in rows("unseen-mnms-B")} == {"B"}
    assert {r["vendor_name"] for r in rows("unseen-mnms-C")} == {"GE"}
    assert {(r["vendor"], r["sequence"]) for r in rows("unseen-lge")} == {("B", "LGE")}


def test_acdc_test_site_loads_with_a_support_bank_per_group():
    site = Site(config("acdc-test"), CFG, SITES)
    support, evaluated = site_cases(site.train_set), site_cases(site.val_set)
    assert support == {patient(n) for n in (20, 40, 58, 99)}  # as its YAML comment says
    assert len(evaluated) == 16 and not support & evaluated
    assert support | evaluated == cases("acdc-test")
    assert site.train_set.images.shape[1:] == (1, 64, 64)


def test_a_group_site_loads_and_splits_12_4():
    site = Site(config("acdc-RV"), CFG, SITES)
    train, val = site_cases(site.train_set), site_cases(site.val_set)
    assert (len(train), len(val)) == (12, 4) and not train & val


@pytest.mark.parametrize("name", list(UNSEEN))
def test_unseen_site_loads(name):
    site = Site(config(name), CFG, SITES)
    n, support = UNSEEN[name]
    assert len(site_cases(site.train_set)) == support
    assert len(site_cases(site.val_set)) == n - support
