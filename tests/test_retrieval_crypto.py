"""Tests of jras_core.retrieval.crypto: banks encrypted at rest (AES-256-GCM), keys, tampering."""

from __future__ import annotations

import base64
import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from bank_sites import posix_only
from discs import disc_slices

from jras_core.data.volume import DataError
from jras_core.retrieval.bank import RetrievalBank
from jras_core.retrieval.crypto import (
    ENV_VAR,
    HEADER,
    NONCE_BYTES,
    BankDecryptError,
    BankKey,
    BankKeyError,
    generate_key_file,
    load_key_file,
    resolve_key,
)
from jras_core.retrieval.store import BankStore

pytestmark = pytest.mark.usefixtures("no_bank_key_env")


def _bank(embed: bool = True) -> RetrievalBank:
    bank = RetrievalBank(disc_slices(n_cases=3, per_case=2), num_classes=2)
    if embed:
        emb = np.random.default_rng(0).normal(size=(len(bank), 8)).astype(np.float32)
        bank.set_embeddings(emb / np.linalg.norm(emb, axis=1, keepdims=True))
    return bank


def _same(a: RetrievalBank, b: RetrievalBank) -> None:
    assert torch.equal(a.slices.images, b.slices.images) and torch.equal(a.slices.masks, b.slices.masks)
    assert a.slices.cases == b.slices.cases
    if a.embeddings is None:
        assert b.embeddings is None
    else:
        assert np.array_equal(a.embeddings, b.embeddings)


@pytest.fixture
def key_file(tmp_path) -> Path:
    return generate_key_file(tmp_path / "keys" / "bank.key")


@posix_only
def test_generate_key_file_is_0600_and_refuses_overwrite(tmp_path):
    path = generate_key_file(tmp_path / "k" / "bank.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_bytes()
    assert len(base64.b64decode(first.strip())) == 32
    with pytest.raises(BankKeyError, match="already exists"):
        generate_key_file(path)
    assert path.read_bytes() == first
    generate_key_file(path, overwrite=True)
    assert path.read_bytes() != first and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["bank.key"]  # no temporary left behind


@posix_only
def test_key_file_readable_by_others_is_refused(tmp_path, key_file):
    os.chmod(key_file, 0o644)
    with pytest.raises(BankKeyError) as err:
        load_key_file(key_file)
    msg = str(err.value)
    assert str(key_file) in msg and f"chmod 600 {key_file}" in msg and "0644" in msg
    os.chmod(key_file, 0o400)  # stricter is fine
    assert isinstance(load_key_file(key_file), BankKey)


def test_key_file_raw_bytes_and_bad_contents(tmp_path):
    raw = os.urandom(32)
    path = tmp_path / "raw.key"
    path.write_bytes(raw)
    os.chmod(path, 0o600)
    assert load_key_file(path) == BankKey(raw)
    path.write_bytes(b"not a key\n")
    with pytest.raises(BankKeyError, match="not a bank key"):
        load_key_file(path)
    with pytest.raises(BankKeyError, match="not found"):
        load_key_file(tmp_path / "missing.key")
    with pytest.raises(BankKeyError, match="32 bytes"):
        BankStore(tmp_path, key=b"short")


def test_key_from_env_and_precedence(tmp_path, key_file, monkeypatch):
    assert resolve_key() is None
    env = os.urandom(32)
    monkeypatch.setenv(ENV_VAR, base64.b64encode(env).decode())
    assert resolve_key() == BankKey(env)
    assert resolve_key(key_file) == load_key_file(key_file) != BankKey(env)  # an explicit file wins
    monkeypatch.setenv(ENV_VAR, "@@@")
    with pytest.raises(BankKeyError, match=ENV_VAR):
        resolve_key()


def test_round_trip_with_key_file(tmp_path, key_file):
    bank = _bank()
    store = BankStore(tmp_path / "bank", key=load_key_file(key_file))
    path = bank.save(store.directory, store=store)
    assert path.name == "bank.enc" and not (tmp_path / "bank" / "bank.npz").exists()
    assert path.read_bytes().startswith(HEADER)
    again = RetrievalBank.load(store.directory, store=BankStore(tmp_path / "bank", key=load_key_file(key_file)))
    _same(bank, again)


def test_round_trip_with_env_key_and_unembedded_bank(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, base64.b64encode(os.urandom(32)).decode())
    bank = _bank(embed=False)
    store = BankStore(tmp_path / "bank", key=resolve_key())
    bank.save(store.directory, store=store)
    _same(bank, RetrievalBank.load(store.directory, store=BankStore(tmp_path / "bank", key=resolve_key())))


def test_fresh_nonce_per_write(tmp_path, key_file):
    store = BankStore(tmp_path, key=load_key_file(key_file))
    _bank().save(tmp_path, store=store)
    a = store.path.read_bytes()
    _bank().save(tmp_path, store=store)
    b = store.path.read_bytes()
    assert a[len(HEADER):len(HEADER) + NONCE_BYTES] != b[len(HEADER):len(HEADER) + NONCE_BYTES]


def _encrypted(tmp_path: Path, key_file: Path) -> BankStore:
    store = BankStore(tmp_path / "bank", key=load_key_file(key_file))
    _bank().save(store.directory, store=store)
    return store


def test_wrong_key(tmp_path, key_file):
    store = _encrypted(tmp_path, key_file)
    with pytest.raises(BankDecryptError, match="cannot decrypt bank .*wrong key or the file was modified/truncated"):
        RetrievalBank.load(store.directory, store=BankStore(store.directory, key=os.urandom(32)))


def test_any_flipped_byte_is_detected(tmp_path, key_file):
    store = _encrypted(tmp_path, key_file)
    data = store.path.read_bytes()
    key = load_key_file(key_file)
    n = len(data)
    # every header and nonce byte, the first and last ciphertext bytes, the tag, and a sample between
    positions = sorted(set(range(len(HEADER) + NONCE_BYTES + 4)) | set(range(n - 20, n)) | set(range(0, n, max(1, n // 50))))
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 0x01
        store.path.write_bytes(bytes(bad))
        with pytest.raises(BankDecryptError, match="cannot decrypt bank"):
            BankStore(store.directory, key=key).load()
    store.path.write_bytes(data)
    BankStore(store.directory, key=key).load()  # the original still decrypts


def test_truncated_file(tmp_path, key_file):
    store = _encrypted(tmp_path, key_file)
    data = store.path.read_bytes()
    for cut in (0, 5, len(HEADER) + NONCE_BYTES, len(data) // 2, len(data) - 1):
        store.path.write_bytes(data[:cut])
        with pytest.raises(BankDecryptError, match="wrong key or the file was modified/truncated"):
            RetrievalBank.load(store.directory, store=BankStore(store.directory, key=load_key_file(key_file)))


def test_plaintext_vs_encrypted_mismatch(tmp_path, key_file):
    key = load_key_file(key_file)
    plain_dir, enc_dir = tmp_path / "plain", tmp_path / "enc"
    _bank().save(plain_dir)
    with pytest.raises(DataError, match="not encrypted but a key was given"):
        RetrievalBank.load(plain_dir, store=BankStore(plain_dir, key=key))
    _bank().save(enc_dir, store=BankStore(enc_dir, key=key))
    with pytest.raises(DataError, match="encrypted but no key was given"):
        RetrievalBank.load(enc_dir)
    # writing plaintext over an encrypted bank would silently drop encryption: refused
    with pytest.raises(BankKeyError, match="encrypted bank is here"):
        _bank().save(enc_dir)
    # encrypting a plaintext bank replaces it
    _bank().save(plain_dir, store=BankStore(plain_dir, key=key))
    assert sorted(p.name for p in plain_dir.iterdir()) == ["bank.enc"]


def test_key_never_leaks(tmp_path, key_file, caplog):
    caplog.set_level(logging.DEBUG)
    key = load_key_file(key_file)
    raw = key._key
    secrets = [raw, base64.b64encode(raw), base64.b64encode(raw).rstrip(b"="), raw.hex().encode()]
    store = BankStore(tmp_path / "bank", key=key)
    _bank().save(store.directory, store=store)
    data = store.path.read_bytes()
    messages = [repr(key), str(key), repr(store)]
    for attempt in (
        lambda: BankStore(store.directory, key=os.urandom(32)).load(),
        lambda: BankStore(store.directory).load(),
        lambda: (store.path.write_bytes(data[:-3]), store.load()),
    ):
        with pytest.raises(ValueError) as err:
            attempt()
        messages += [str(err.value), repr(err.value)]
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(key)
    text = "\n".join(messages + [caplog.text]).encode()
    for secret in secrets:
        assert secret not in data
        assert secret not in text
        assert secret.decode("latin-1") not in "\n".join(messages + [caplog.text])


def test_crash_during_write_keeps_previous_bank(tmp_path, key_file, monkeypatch):
    key = load_key_file(key_file)
    store = _encrypted(tmp_path, key_file)
    before = store.path.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    bigger = RetrievalBank(disc_slices(n_cases=4), num_classes=2)
    with pytest.raises(OSError, match="disk full"):
        bigger.save(store.directory, store=BankStore(store.directory, key=key))
    monkeypatch.undo()
    assert store.path.read_bytes() == before
    assert sorted(p.name for p in store.directory.iterdir()) == ["bank.enc"]  # temporary removed
    _same(_bank(), RetrievalBank.load(store.directory, store=BankStore(store.directory, key=key)))


def test_a_bank_of_another_key_is_not_replaced_but_can_be_re_keyed(tmp_path, key_file):
    bank = _bank()
    old = load_key_file(key_file)
    new = BankKey(os.urandom(32), source="new.key")
    bank.save(tmp_path / "bank", store=BankStore(tmp_path / "bank", key=old))
    before = (tmp_path / "bank" / "bank.enc").read_bytes()
    with pytest.raises(BankKeyError, match=r"bank\.enc: the bank here is encrypted with another key than new\.key"):
        bank.save(tmp_path / "bank", store=BankStore(tmp_path / "bank", key=new))
    assert (tmp_path / "bank" / "bank.enc").read_bytes() == before
    with pytest.raises(BankDecryptError):  # a wrong old key re-keys nothing
        BankStore(tmp_path / "bank", key=new).rekey(os.urandom(32))
    assert (tmp_path / "bank" / "bank.enc").read_bytes() == before
    BankStore(tmp_path / "bank", key=new).rekey(old)
    _same(bank, RetrievalBank.load(tmp_path / "bank", store=BankStore(tmp_path / "bank", key=new)))
    with pytest.raises(BankDecryptError):
        BankStore(tmp_path / "bank", key=old).load()
    bank.save(tmp_path / "bank", store=BankStore(tmp_path / "bank", key=new))  # its own key replaces it
