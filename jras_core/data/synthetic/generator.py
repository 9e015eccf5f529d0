"""Generation of synthetic cases of one vendor as :class:`~jras_core.data.volume.Volume` objects.

Seeding: each case's anatomy and each phase's rendering draw from their own
generator, seeded by the seed, the vendor name, the case index and the phase,
so the same arguments give identical arrays and vendors never share anatomy.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from jras_core.data.synthetic.anatomy import _sample_anatomy
from jras_core.data.synthetic.render import _render
from jras_core.data.synthetic.vendors import VendorSpec, get_vendor
from jras_core.data.volume import DataError, Volume

log = logging.getLogger(__name__)

PHASES: tuple[str, ...] = ("ED", "ES")
"""Cardiac phases the generator knows."""

LABELS: dict[int, str] = {0: "background", 1: "LV", 2: "MYO", 3: "RV"}
"""Mask labels (M&Ms convention)."""

DEFAULT_CASE_PREFIX = "syn"


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
