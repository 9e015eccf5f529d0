"""Storage of a site's bank on disk: one file, written atomically.

The bank (slices, masks, case table, embeddings) is serialised to one ``.npz``
payload. :class:`BankStore` is the single place where bank bytes touch the
disk, so encryption at rest wraps this class and nothing else.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from jras_core.data.volume import DataError

BANK_FILE = "bank.npz"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename.

    A crash at any point leaves either the previous file or the new one, never a mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class BankStore:
    """Reads and writes a bank directory.

    Args:
        directory: the bank directory; the payload lives in ``directory/bank.npz``.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    @property
    def path(self) -> Path:
        return self.directory / BANK_FILE

    def exists(self) -> bool:
        return self.path.is_file()

    def encode(self, arrays: dict[str, np.ndarray], meta: dict) -> bytes:
        buf = io.BytesIO()
        meta_arr = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        np.savez(buf, __meta__=meta_arr, **arrays)
        return buf.getvalue()

    def decode(self, data: bytes) -> tuple[dict[str, np.ndarray], dict]:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except Exception as exc:  # zip / npy format errors of many kinds
            raise DataError(f"{self.path}: bank file is corrupt or truncated ({exc})") from None
        if "__meta__" not in arrays:
            raise DataError(f"{self.path}: bank file has no metadata record")
        meta = json.loads(arrays.pop("__meta__").tobytes().decode())
        return arrays, meta

    def save(self, arrays: dict[str, np.ndarray], meta: dict) -> Path:
        atomic_write_bytes(self.path, self.encode(arrays, meta))
        return self.path

    def load(self) -> tuple[dict[str, np.ndarray], dict]:
        if not self.exists():
            raise DataError(f"{self.path}: no bank here (build one with `jras bank build`)")
        return self.decode(self.path.read_bytes())
