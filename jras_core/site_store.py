"""A site's encrypted store of derived data: preprocessed slices and bank embeddings.

Everything a site derives from its scans is private like the scans. :class:`SiteStore` keeps
each artefact as one file sealed with AES-256-GCM under the site's key
(:class:`~jras_core.retrieval.crypto.BankKey`), written atomically
(:func:`~jras_core.files.atomic_write_bytes`: the temporary file lies beside the target and
holds ciphertext only)::

    <directory>/<site>.<kind>-<digest>.enc

``kind`` names the artefact (``slices``: the preprocessed slices, images and masks; ``bank``:
the bank's embeddings and the retriever state they were computed with) and ``digest`` the
inputs it was derived from (the data files' bytes, the preprocessing, the split). Site, kind
and digest are bound to the ciphertext as associated data, so a file renamed or swapped for
another fails to decrypt. The payload is an ``.npz`` of arrays and a JSON record, read with
pickles refused (:func:`~jras_core.retrieval.store.encode_arrays`). Writing an artefact
removes the site's files of the same kind with another digest (stale).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from jras_core.files import atomic_write_bytes
from jras_core.retrieval.crypto import BankDecryptError, BankKey
from jras_core.retrieval.store import decode_arrays, encode_arrays

log = logging.getLogger(__name__)

STORE_FORMAT = "jras-site-store/1"
"""Part of every artefact's associated data: a file of another format does not decrypt."""

KINDS = ("slices", "bank")
"""The artefacts a site stores."""


class SiteStore:
    """The encrypted artefacts of one site in ``directory``.

    Args:
        directory: the folder (shared by several sites: every file name starts with the site's).
        key: the site's 32-byte key; never shown in reprs or messages.
        site: the site's name (a safe file name part, :func:`jras_core.site.check_site_name`).
    """

    def __init__(self, directory: str | Path, key: bytes | BankKey, site: str):
        self.directory = Path(directory)
        self._key = BankKey(key)
        self.site = site

    def __repr__(self) -> str:
        return f"SiteStore({str(self.directory)!r}, site={self.site!r})"

    def path(self, kind: str, digest: str) -> Path:
        """The file of artefact ``kind`` derived from inputs of ``digest`` (hex)."""
        if kind not in KINDS or not re.fullmatch(r"[0-9a-f]{8,64}", digest):
            raise ValueError(f"site store: bad artefact {kind!r} / digest {digest!r}")
        return self.directory / f"{self.site}.{kind}-{digest}.enc"

    def files(self, kind: str) -> list[Path]:
        """The site's files of ``kind`` in the directory, whatever their digest."""
        pattern = re.compile(re.escape(f"{self.site}.{kind}-") + r"[0-9a-f]{8,64}\.enc")
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if pattern.fullmatch(p.name))

    def _context(self, kind: str, digest: str) -> bytes:
        return f"{STORE_FORMAT}|{self.site}|{kind}|{digest}".encode()

    def save(self, kind: str, digest: str, arrays: dict[str, np.ndarray], meta: dict) -> Path:
        """Seal ``arrays`` and ``meta`` as artefact ``kind`` of ``digest``, atomically; then
        remove the site's files of ``kind`` with another digest."""
        path = self.path(kind, digest)
        payload = encode_arrays(arrays, meta)
        atomic_write_bytes(path, self._key.encrypt(payload, self._context(kind, digest)))
        del payload
        for stale in self.files(kind):
            if stale != path:
                stale.unlink(missing_ok=True)
                log.info("site %s: removed the stale %s %s", self.site, kind, stale.name)
        return path

    def load(self, kind: str, digest: str) -> tuple[dict[str, np.ndarray], dict] | None:
        """Artefact ``kind`` of ``digest``, or None when it is not stored.

        Raises:
            BankDecryptError: the file does not decrypt with this key (another key, or the file
                was modified, truncated or swapped), naming the file and what to do.
        """
        path = self.path(kind, digest)
        if not path.is_file():
            return None
        try:
            payload = self._key.decrypt(path.read_bytes(), path, self._context(kind, digest),
                                        what="site store file")
        except BankDecryptError as exc:
            raise BankDecryptError(
                f"{exc} (key {self._key.source}). It holds data derived from the site's scans: if the "
                f"site's key changed, delete the file and it is rebuilt from the data"
            ) from None
        return decode_arrays(payload, path, "site store file")

    def rekey(self, old_key: bytes | BankKey) -> list[Path]:
        """Re-encrypt every artefact of the site from ``old_key`` to this store's key (each file
        atomically; a file the old key does not decrypt is a :class:`BankDecryptError`, and
        leaves the files not yet done under the old key). Returns the files re-encrypted."""
        old = BankKey(old_key)
        done = []
        for kind in KINDS:
            for path in self.files(kind):
                digest = path.name[len(f"{self.site}.{kind}-"):-len(".enc")]
                context = self._context(kind, digest)
                payload = old.decrypt(path.read_bytes(), path, context, what="site store file")
                atomic_write_bytes(path, self._key.encrypt(payload, context))
                del payload
                done.append(path)
        return done
