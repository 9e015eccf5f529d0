"""Storage of a site's bank on disk: one file, written atomically.

The bank (slices, masks, case table, embeddings) is serialised to one ``.npz``
payload. :class:`BankStore` is the single place where bank bytes touch the
disk, so encryption at rest wraps this class and nothing else: with a key, the
payload is sealed with AES-256-GCM (:mod:`jras_core.retrieval.crypto`) and stored
as ``bank.enc`` instead of ``bank.npz``.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np

from jras_core.data.volume import DataError
from jras_core.files import atomic_write_bytes
from jras_core.retrieval.crypto import ENV_VAR, BankDecryptError, BankKey, BankKeyError, is_encrypted

log = logging.getLogger(__name__)

BANK_FILE = "bank.npz"
ENCRYPTED_BANK_FILE = "bank.enc"


def encode_arrays(arrays: dict[str, np.ndarray], meta: dict) -> bytes:
    """One ``.npz`` payload of named arrays plus a JSON ``meta`` record (no pickles)."""
    buf = io.BytesIO()
    meta_arr = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(buf, __meta__=meta_arr, **arrays)
    return buf.getvalue()


def decode_arrays(data: bytes, where: str | Path, what: str = "file") -> tuple[dict[str, np.ndarray], dict]:
    """Inverse of :func:`encode_arrays` (pickles refused); a damaged payload is a
    :class:`DataError` naming ``where``."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:  # zip / npy format errors of many kinds
        raise DataError(f"{where}: {what} is corrupt or truncated ({exc})") from None
    if "__meta__" not in arrays:
        raise DataError(f"{where}: {what} has no metadata record")
    meta = json.loads(arrays.pop("__meta__").tobytes().decode())
    return arrays, meta


class BankStore:
    """Reads and writes a bank directory.

    Args:
        directory: the bank directory; the payload lives in ``directory/bank.npz``
            (plaintext) or ``directory/bank.enc`` (encrypted).
        key: the site's 32-byte bank key (bytes or :class:`BankKey`); with a key,
            :meth:`save` encrypts and :meth:`load` decrypts. Never shown in reprs.
    """

    def __init__(self, directory: str | Path, key: bytes | BankKey | None = None):
        self.directory = Path(directory)
        self._key = None if key is None else BankKey(key)

    def __repr__(self) -> str:
        return f"BankStore({str(self.directory)!r}, encrypted={self.encrypted})"

    @property
    def encrypted(self) -> bool:
        return self._key is not None

    @property
    def plain_path(self) -> Path:
        return self.directory / BANK_FILE

    @property
    def encrypted_path(self) -> Path:
        return self.directory / ENCRYPTED_BANK_FILE

    @property
    def path(self) -> Path:
        """The file this store writes and reads."""
        return self.encrypted_path if self.encrypted else self.plain_path

    def exists(self) -> bool:
        return self.path.is_file()

    def encode(self, arrays: dict[str, np.ndarray], meta: dict) -> bytes:
        return encode_arrays(arrays, meta)

    def decode(self, data: bytes) -> tuple[dict[str, np.ndarray], dict]:
        if is_encrypted(data):
            raise DataError(f"{self.path}: this bank is encrypted; give its key (see `jras site init`)")
        return decode_arrays(data, self.path, "bank file")

    def check_key_matches(self) -> None:
        """Refuse (:class:`BankKeyError`) when an encrypted bank is in the directory that this
        store's key does not decrypt: replacing it would silently re-key the site's bank (its
        configured key would no longer read it). Nothing to check without a key or a bank."""
        if self._key is None or not self.encrypted_path.is_file():
            return
        try:
            self._key.decrypt(self.encrypted_path.read_bytes(), self.encrypted_path)
        except BankDecryptError:
            raise BankKeyError(
                f"{self.encrypted_path}: the bank here is encrypted with another key than {self._key.source} "
                f"(or is damaged); refusing to replace it. To move the bank to this key, run `jras site init "
                f"--rekey` (it decrypts with the old key first); to rebuild it, delete it first"
            ) from None

    def save(self, arrays: dict[str, np.ndarray], meta: dict) -> Path:
        """Write the bank as one file, atomically (encrypted when the store has a key).

        Writing an encrypted bank removes a plaintext one left in the directory; writing a
        plaintext bank where an encrypted one is refuses (that would silently drop encryption),
        and so does writing over an encrypted bank of another key (:meth:`check_key_matches`).
        """
        self.check_key_matches()
        payload = self.encode(arrays, meta)
        if self._key is None:
            if self.encrypted_path.is_file():
                raise BankKeyError(
                    f"{self.encrypted_path}: an encrypted bank is here; give the site's key "
                    f"(key_file in the site YAML, --key-file or ${ENV_VAR}) to replace it, or delete it first"
                )
            atomic_write_bytes(self.path, payload)
            return self.path
        atomic_write_bytes(self.path, self._key.encrypt(payload))
        del payload
        if self.plain_path.is_file():
            self.plain_path.unlink()
            log.warning("removed the plaintext bank %s (the encrypted bank replaces it)", self.plain_path)
        return self.path

    def load(self) -> tuple[dict[str, np.ndarray], dict]:
        """Read the bank; a mismatch of key and file (encrypted vs plaintext) is a clear error."""
        if self._key is None:
            if not self.plain_path.is_file() and self.encrypted_path.is_file():
                raise DataError(
                    f"{self.encrypted_path}: this bank is encrypted but no key was given "
                    f"(set key_file in the site YAML, pass --key-file, or set ${ENV_VAR})"
                )
        elif not self.encrypted_path.is_file() and self.plain_path.is_file():
            raise DataError(
                f"{self.plain_path}: this bank is not encrypted but a key was given; rebuild it "
                f"encrypted (`jras site init` or `jras bank build`) or load it without a key"
            )
        if not self.exists():
            raise DataError(f"{self.path}: no bank here (build one with `jras bank build`)")
        data = self.path.read_bytes()
        if self._key is not None:
            data = self._key.decrypt(data, self.path)  # all-or-nothing: nothing is decoded on failure
        return self.decode(data)

    def rekey(self, old_key: bytes | BankKey) -> Path:
        """Re-encrypt the directory's bank from ``old_key`` to this store's key, atomically:
        the bank is decrypted with ``old_key`` first (a wrong old key changes nothing, a
        :class:`~jras_core.retrieval.crypto.BankDecryptError`), and its content is kept as is.

        Returns:
            the bank file.
        """
        if self._key is None:
            raise BankKeyError(f"{self.directory}: re-keying a bank needs the new key")
        old = BankKey(old_key)
        if old == self._key:
            raise BankKeyError(
                f"{self.encrypted_path}: the old key ({old.source}) and the new key ({self._key.source}) are the same"
            )
        if not self.encrypted_path.is_file():
            raise DataError(f"{self.encrypted_path}: no encrypted bank here to re-key")
        payload = old.decrypt(self.encrypted_path.read_bytes(), self.encrypted_path)
        atomic_write_bytes(self.encrypted_path, self._key.encrypt(payload))
        del payload
        return self.encrypted_path
