"""Site YAMLs and site configs of the synthetic vendors, for the demo and the benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from jras_core.files import PROJECT_ROOT

if TYPE_CHECKING:
    from jras_core.site import SiteConfig


def synthetic_site(vendor: str, cases: int, seed: int, size: int, support: int | None = None) -> SiteConfig:
    """A site config for a built-in synthetic vendor."""
    from jras_core.data.sources import DataSourceConfig
    from jras_core.site import SiteConfig

    data = DataSourceConfig(kind="synthetic", vendor=vendor, cases=cases, seed=seed, size=size)
    return SiteConfig(name=f"synthetic-{vendor}", vendor=vendor, data=data, support_cases=support)


DEMO_VENDORS = "ABCD"


def demo_sites(folder: Path, cases: int, size: int) -> list[Path]:
    """Copies of ``sites/synthetic-{A..D}.yaml`` in ``folder`` with ``cases`` cases
    generated at ``size`` pixels (same vendors, seeds and splits)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for vendor in DEMO_VENDORS:
        data = yaml.safe_load((PROJECT_ROOT / "sites" / f"synthetic-{vendor}.yaml").read_text())
        data["data"].update({"cases": int(cases), "size": int(size)})
        path = folder / f"synthetic-{vendor}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        paths.append(path)
    return paths
