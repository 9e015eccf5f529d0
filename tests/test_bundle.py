"""The app bundle that `flwr run` uploads carries code and configs only: no data,
keys, certificates, banks or weights, even when such files lie in the app folder."""

from __future__ import annotations

import io
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
FORBIDDEN_SUFFIXES = (".nii", ".nii.gz", ".png", ".pt", ".pth", ".npz", ".enc", ".key", ".pem", ".crt", ".csv")


def _tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=PROJECT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [line for line in out.stdout.splitlines() if line]


def _bundle_names(app: Path) -> list[str]:
    from flwr.cli.build import build_fab_from_disk

    fab = build_fab_from_disk(app)
    assert len(fab) < 10 * 1024 * 1024  # Flower's bundle cap
    with zipfile.ZipFile(io.BytesIO(fab)) as zf:
        return zf.namelist()


def test_bundle_holds_no_data_keys_or_weights(tmp_path: Path):
    app = tmp_path / "app"
    for rel in _tracked_files():
        dst = app / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT / rel, dst)
    planted = {
        "data/case1_ED.nii.gz": b"\x1f\x8b fake volume",
        "data/manifest.csv": b"case,phase,vendor,image,mask\n",
        "data/busi/benign_1.png": b"\x89PNG fake",
        "keys/node.key": b"-----BEGIN OPENSSH PRIVATE KEY-----\n",
        "certs/server.pem": b"-----BEGIN CERTIFICATE-----\n",
        "certs/ca.crt": b"-----BEGIN CERTIFICATE-----\n",
        "banks/A/bank.enc": b"JRASBANK\x01 ciphertext",
        "banks/B/bank.npz": b"PK fake npz",
        "runs/federation/run-1/checkpoint.pt": b"fake weights",
        "model.pt": b"fake weights",
        ".venv/lib/site.py": b"print('venv')",
    }
    for rel, content in planted.items():
        path = app / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)

    names = _bundle_names(app)
    assert "pyproject.toml" in names and "client/client_app.py" in names and "server/server_app.py" in names
    leaked = [n for n in names if n in planted or n.endswith(FORBIDDEN_SUFFIXES) or n.startswith((".venv/", "runs/"))]
    assert not leaked, leaked
