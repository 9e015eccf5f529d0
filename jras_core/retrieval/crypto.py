"""Encryption at rest of a site's bank: AES-256-GCM with a per-site key.

Key sources, in this order (see :func:`resolve_key`): a key file given explicitly
(``--key-file``), the site YAML's ``key_file``, the ``JRAS_BANK_KEY`` environment
variable (base64). A key file holds 32 raw bytes or their base64 text and must be
readable by its owner only (mode 0600 or stricter).

Encrypted file layout::

    MAGIC (8 bytes, b"JRASBANK") | format version (1 byte) | nonce (12 bytes) | ciphertext + tag (16 bytes)

The magic and version (the header), plus an optional ``context`` naming what the file
holds (a site store binds its artefact's kind and digest, :mod:`jras_core.site_store`), are
bound as associated data, so a changed header, ciphertext, tag or nonce, a truncated file,
a file swapped for another and a wrong key all fail the same authentication check. A fresh
random nonce is drawn for every write.

The key is held in a :class:`BankKey`, whose ``repr``/``str`` never show it; no
message, log record or file written by this module contains it.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from jras_core.config import ConfigError
from jras_core.data.volume import DataError
from jras_core.files import atomic_write_bytes

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
MAGIC = b"JRASBANK"
FORMAT_VERSION = 1
HEADER = MAGIC + bytes([FORMAT_VERSION])
ENV_VAR = "JRAS_BANK_KEY"


class BankKeyError(ConfigError):
    """A bank key is missing, malformed or stored insecurely (the message names the source, never the key)."""


class BankDecryptError(DataError):
    """An encrypted bank cannot be decrypted: wrong key, modified or truncated file."""


class BankKey:
    """A 32-byte AES-256 key that does not show itself in reprs, strings or tracebacks.

    Args:
        key: the 32 key bytes.
        source: where it came from (a file path or ``$JRAS_BANK_KEY``), for messages.
    """

    __slots__ = ("_key", "source")

    def __init__(self, key: bytes, source: str = "<bytes>"):
        if isinstance(key, BankKey):
            key, source = key._key, key.source
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
            n = len(key) if isinstance(key, (bytes, bytearray)) else type(key).__name__
            raise BankKeyError(f"{source}: a bank key must be {KEY_BYTES} bytes (AES-256), got {n}")
        self._key = bytes(key)
        self.source = source

    def __repr__(self) -> str:
        return f"BankKey(source={self.source!r}, key=<redacted>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BankKey) and self._key == other._key

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self):  # never pickle key material by accident
        raise TypeError("BankKey cannot be pickled")

    # ------------------------------------------------------------------ cipher
    def encrypt(self, plaintext: bytes, context: bytes = b"") -> bytes:
        """``HEADER | nonce | AES-256-GCM(plaintext, aad=HEADER + context)`` with a fresh random
        nonce; ``context`` (not stored) must be given again to :meth:`decrypt`."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        nonce = os.urandom(NONCE_BYTES)
        return HEADER + nonce + AESGCM(self._key).encrypt(nonce, plaintext, HEADER + context)

    def decrypt(self, data: bytes, where: str | Path = "<bytes>", context: bytes = b"", what: str = "bank") -> bytes:
        """Inverse of :meth:`encrypt` (with the same ``context``); any failure is one
        :class:`BankDecryptError` naming ``what`` and ``where``."""
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        failed = f"cannot decrypt {what} {where}: wrong key or the file was modified/truncated/swapped"
        if len(data) < len(HEADER) + NONCE_BYTES + TAG_BYTES or not data.startswith(MAGIC):
            raise BankDecryptError(failed)
        version = data[len(MAGIC)]
        if version != FORMAT_VERSION:
            raise BankDecryptError(
                f"cannot decrypt {what} {where}: format version {version} is not supported "
                f"(this J-RAS reads version {FORMAT_VERSION}); the file was modified or written by a newer J-RAS"
            )
        nonce = data[len(HEADER):len(HEADER) + NONCE_BYTES]
        try:
            return AESGCM(self._key).decrypt(nonce, data[len(HEADER) + NONCE_BYTES:], HEADER + context)
        except InvalidTag:
            raise BankDecryptError(failed) from None


def is_encrypted(data: bytes) -> bool:
    """Whether ``data`` starts like an encrypted bank."""
    return data.startswith(MAGIC)


# --------------------------------------------------------------------------- keys


def _decode_key_text(raw: bytes, source: str) -> bytes:
    if len(raw) == KEY_BYTES:
        return raw
    try:
        key = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise BankKeyError(
            f"{source}: not a bank key (expected {KEY_BYTES} raw bytes or their base64 text; "
            f"create one with `jras site init` or generate_key_file)"
        )
    return key


def check_key_file_mode(path: str | Path) -> None:
    """Refuse a key file that its group or others can read or write (POSIX only)."""
    if os.name != "posix":
        return
    path = Path(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise BankKeyError(
            f"{path}: key file permissions are {mode:04o}, must be 0600 or stricter "
            f"(only its owner may read it); fix with `chmod 600 {path}`"
        )


def load_key_file(path: str | Path) -> BankKey:
    """Read a key file (32 raw bytes or base64 text, mode 0600 or stricter)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BankKeyError(f"{path}: key file not found (create it with `jras site init`)")
    check_key_file_mode(path)
    return BankKey(_decode_key_text(path.read_bytes(), str(path)), source=str(path))


def key_from_env(environ: Mapping[str, str] | None = None) -> BankKey | None:
    """The key in ``$JRAS_BANK_KEY`` (base64), or None when the variable is unset or empty."""
    value = (os.environ if environ is None else environ).get(ENV_VAR, "")
    if not value.strip():
        return None
    return BankKey(_decode_key_text(value.encode(), f"${ENV_VAR}"), source=f"${ENV_VAR}")


def resolve_key(
    key_file: str | Path | None = None, use_env: bool = True, environ: Mapping[str, str] | None = None
) -> BankKey | None:
    """The key from ``key_file`` if given, else from ``$JRAS_BANK_KEY`` (if ``use_env``), else None."""
    if key_file:
        return load_key_file(key_file)
    return key_from_env(environ) if use_env else None


def generate_key_file(path: str | Path, overwrite: bool = False) -> Path:
    """Write a new random 32-byte key (base64 text) to ``path`` with mode 0600, atomically.

    Refuses to replace an existing file unless ``overwrite`` (a lost key makes its bank unreadable).
    """
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise BankKeyError(f"{path}: a key file already exists; refusing to overwrite it (its bank needs it)")
    text = base64.b64encode(os.urandom(KEY_BYTES)) + b"\n"
    try:
        atomic_write_bytes(path, text, mode=0o600, exclusive=not overwrite)
    except FileExistsError:
        raise BankKeyError(f"{path}: a key file already exists; refusing to overwrite it") from None
    return path
