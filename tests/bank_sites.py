"""A tiny synthetic site YAML whose bank may be encrypted at rest, and the mark of the tests
that need POSIX file modes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")


def site_yaml(tmp_path: Path, key_file: str | None = "secrets/bank.key") -> Path:
    """``tmp_path/site/site.yaml``: a synthetic site with ``bank_dir: bank`` and, unless
    ``key_file`` is ``None``, that ``key_file``."""
    folder = tmp_path / "site"
    folder.mkdir(parents=True)
    path = folder / "site.yaml"
    text = "name: tiny\nvendor: A\nval_fraction: 0.34\nbank_dir: bank\ndata: {kind: synthetic, vendor: A, cases: 3, size: 32}\n"
    if key_file:
        text += f"key_file: {key_file}\n"
    path.write_text(text)
    return path
