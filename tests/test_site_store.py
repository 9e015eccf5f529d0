"""Tests of jras_core.site_store and its use by a site: sealed artefacts, tampering, keys,
digests, bank embeddings reused for the same retriever weights, no key."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from jras_core.config import JRASConfig
from jras_core.models.jras import build_model
from jras_core.retrieval.crypto import BankDecryptError, generate_key_file
from jras_core.site import Site, SiteConfig
from jras_core.site_store import SiteStore

CFG = JRASConfig().with_overrides({"preprocess.size": 32})
DATA = {"kind": "synthetic", "vendor": "A", "cases": 3, "size": 32}


def _site(tmp_path: Path, key: bool = True, **over) -> Site:
    if key and not (tmp_path / "site.key").exists():
        generate_key_file(tmp_path / "site.key")
    cfg = {"name": "s", "data": DATA, "cache_dir": "store", "val_fraction": 0.34,
           **({"key_file": "site.key"} if key else {}), **over}
    return Site(SiteConfig.from_dict(cfg, root=tmp_path), CFG, tmp_path)


def test_artefacts_round_trip_and_are_bound_to_their_name(tmp_path):
    store = SiteStore(tmp_path, os.urandom(32), "s")
    arrays = {"x": np.arange(6, dtype=np.float16).reshape(2, 3)}
    path = store.save("slices", "ab" * 8, arrays, {"cases": ["c"]})
    got, meta = store.load("slices", "ab" * 8)
    assert np.array_equal(got["x"], arrays["x"]) and meta == {"cases": ["c"]}
    assert store.load("slices", "cd" * 8) is None
    assert b"cases" not in path.read_bytes()
    # a file renamed to another digest (or kind) does not decrypt: the name is bound to it
    path.rename(store.path("slices", "cd" * 8))
    with pytest.raises(BankDecryptError, match=r"site store file .*s\.slices-cdcd.*\.enc.*modified"):
        store.load("slices", "cd" * 8)
    # a new digest replaces the stale file of its kind, not other kinds or sites
    other = SiteStore(tmp_path, os.urandom(32), "s.slices-x")
    other.save("slices", "ef" * 8, arrays, {})
    store.save("bank", "ab" * 8, arrays, {})
    store.save("slices", "ab" * 8, arrays, {})
    assert sorted(p.name for p in tmp_path.glob("*.enc")) == [
        "s.bank-" + "ab" * 8 + ".enc", "s.slices-" + "ab" * 8 + ".enc", "s.slices-x.slices-" + "ef" * 8 + ".enc"]


def test_a_tampered_file_or_another_key_is_a_clear_error_naming_the_file(tmp_path):
    site = _site(tmp_path)
    n = len(site.slices)
    (path,) = (tmp_path / "store").glob("s.slices-*.enc")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(BankDecryptError, match=rf"{path}.*delete the file and it is rebuilt"):
        _site(tmp_path).slices  # noqa: B018
    path.unlink()
    assert len(_site(tmp_path).slices) == n  # rebuilt from the data
    generate_key_file(tmp_path / "other.key")
    with pytest.raises(BankDecryptError, match=r"cannot decrypt site store file .*other\.key"):
        _site(tmp_path, key_file="other.key").slices  # noqa: B018


def test_a_site_without_a_key_works_in_memory_and_writes_nothing(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("JRAS_BANK_KEY", raising=False)
    with caplog.at_level(logging.WARNING, logger="jras_core.site"):
        site = _site(tmp_path, key=False)
        assert len(site.slices) > 0 and len(site.bank) > 0
    assert "no key" in caplog.text and "cache_dir is not used" in caplog.text
    assert not (tmp_path / "store").exists()


def test_bank_embeddings_are_reused_for_the_same_weights_only(tmp_path):
    cfg = CFG.with_overrides({"retriever.channels": [4, 8], "retriever.embed_dim": 8, "segmenter.channels": [4, 8]})
    model = build_model(cfg)
    first = _site(tmp_path)
    first.method = cfg
    emb = first.refresh_bank(model.retr).embeddings.copy()
    (bank_file,) = (tmp_path / "store").glob("s.bank-*.enc")
    again = _site(tmp_path)
    again.method = cfg
    bank = again.bank
    calls = []
    original = model.retr.forward
    model.retr.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    again.refresh_bank(model.retr)
    assert not calls and np.array_equal(bank.embeddings, emb)  # read, not recomputed
    with torch.no_grad():
        next(model.retr.parameters()).add_(0.5)
    third = _site(tmp_path)
    third.method = cfg
    third.refresh_bank(model.retr)
    assert calls and not np.array_equal(third.bank.embeddings, emb)
    (now,) = (tmp_path / "store").glob("s.bank-*.enc")
    assert now == bank_file and now.read_bytes() != b""  # same entries, new weights: overwritten


def test_a_plaintext_slice_cache_of_earlier_versions_is_removed(tmp_path):
    (tmp_path / "store").mkdir()
    legacy = tmp_path / "store" / "s-0123456789abcdef.pt"
    legacy.write_bytes(b"old")
    keep = tmp_path / "store" / "other-0123456789abcdef.pt"
    keep.write_bytes(b"old")
    assert len(_site(tmp_path).slices) > 0
    assert not legacy.exists() and keep.exists()


def _needles(slices) -> list[bytes]:
    """64-byte windows of a slice's preprocessed image (float32 and float16) and mask, taken
    through the middle of the slice with the most foreground."""
    i = int((slices.masks > 0).flatten(1).sum(1).argmax())
    size = slices.size
    mid = (size // 2) * size  # first pixel of the middle row
    image32 = slices.images[i, 0].numpy().tobytes()[mid * 4: mid * 4 + 64]
    image16 = slices.images[i, 0].half().numpy().tobytes()[mid * 2: mid * 2 + 64]
    mask = slices.masks[i].numpy().tobytes()[mid - 32: mid + 32]
    return [image32, image16, mask]


@pytest.mark.usefixtures("fresh_site_cache")
def test_a_federation_and_predict_leave_no_plaintext_image_or_mask(tmp_path, in_process_grid, monkeypatch):
    """Every file a tiny federation of keyed sites and a ``jras predict`` leave behind (run
    folder, site folders, stores, the temporary folder) is scanned for the bytes of the
    preprocessed images and masks."""
    import tempfile

    import yaml
    from tiny_federation import base_run_config, run_dir, run_server, tiny_method

    from jras_core.data.synthetic import write_dataset
    from jras_core.retrieval.store import encode_arrays
    from tools.cli import main

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read $TMPDIR
    manifest = write_dataset(tmp_path / "data", ["A", "B"], 3, seed=0, size=32)
    sites = []
    for v in "AB":
        folder = tmp_path / f"site-{v}"
        folder.mkdir()
        generate_key_file(folder / "site.key")
        (folder / "site.yaml").write_text(yaml.safe_dump({
            "name": f"scan-{v}", "vendor": v, "val_fraction": 0.34, "key_file": "site.key", "cache_dir": "store",
            "data": {"kind": "manifest", "path": str(manifest), "vendor": v}}))
        sites.append(str(folder / "site.yaml"))
    rc = base_run_config(tmp_path, sites, **{"num-server-rounds": 1})
    run_server(in_process_grid, rc)
    checkpoint = run_dir(rc) / "checkpoint.pt"
    image = next((tmp_path / "data").glob("*_ED.nii.gz"))
    assert main(["predict", str(image), "--checkpoint", str(checkpoint), "--site", sites[0],
                 "--out", str(tmp_path / "predicted"), "--quiet", "--device", "cpu"]) == 0
    method = tiny_method(rc)
    needles = []
    for path in sites:
        site = Site.from_yaml(path, method)
        kinds = {p.name.split(".")[1].split("-")[0] for p in (Path(path).parent / "store").glob("*.enc")}
        assert kinds == {"slices", "bank"}
        slices = site.slices
        found = _needles(slices)
        plain = encode_arrays(*slices.to_arrays())  # what a store without encryption would hold
        assert all(n in plain or n in slices.images.numpy().tobytes() for n in found)
        needles += found
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 10
    leaks = [(str(p), i) for p in files for i, n in enumerate(needles) if n in p.read_bytes()]
    assert not leaks
