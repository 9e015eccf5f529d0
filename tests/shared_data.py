"""Where the real-data fixtures are (``shared/data`` beside the project folder) and the marks
of tests that need them.

Without the fixtures those tests skip, naming the missing folder; with
``JRAS_REQUIRE_SHARED_DATA=1`` (CI) a missing fixture stops the whole run before any test
starts (``tests/conftest.py``), so real-data tests cannot pass by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jras_core.files import SHARED_DATA

SHARED = Path(os.environ.get("JRAS_SHARED_DATA") or SHARED_DATA)
"""The fixtures' folder: ``JRAS_SHARED_DATA`` where set, else ``shared/data`` beside the project."""
REAL_FIXTURES = ("acdc", "mnms-sample", "lge-sample")
"""The fixtures whose manifests the real-data tests read."""


def missing_fixtures(names: tuple[str, ...] = REAL_FIXTURES) -> list[str]:
    """The fixtures of ``names`` without a ``manifest.csv`` under :data:`SHARED`."""
    return [n for n in names if not (SHARED / n / "manifest.csv").is_file()]


def needs(*names: str) -> pytest.MarkDecorator:
    """Skip unless the fixtures ``names`` (default: :data:`REAL_FIXTURES`) are present."""
    missing = missing_fixtures(names or REAL_FIXTURES)
    return pytest.mark.skipif(bool(missing), reason=f"real data fixtures {', '.join(missing)} not found under {SHARED}")
