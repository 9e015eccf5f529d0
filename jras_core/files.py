"""Files: atomic writes and path resolution, the one implementation of each.

Everything the project writes that a crash must not leave half-written (checkpoints, banks,
key files, caches, manifests, results) goes through :func:`atomic_write_bytes`; every path
given relative to a config file or a project folder goes through :func:`resolve_path`.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
"""The folder holding ``jras_core``, ``client``, ``server``, ``sites`` and ``configs``
(the repository, or the installed Flower App Bundle)."""

SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"
"""The real-data fixtures beside the project folder (ACDC, the M&Ms sample, LGE, BUSI), read in
place by the benchmarks and the tests."""


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int | None = None, exclusive: bool = False) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync and rename.

    A crash at any point leaves either the previous file or the new one, never a mix.

    Args:
        path: the target file; its folder is created.
        data: the bytes to write.
        mode: permission bits of the new file (e.g. ``0o600`` for a key); default: those of
            :func:`tempfile.mkstemp` (owner read/write only).
        exclusive: fail with :class:`FileExistsError` if ``path`` exists (an atomic
            create-if-absent where the file system has hard links).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode is not None and hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if not exclusive:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise
            except OSError:  # no hard links on this file system
                if path.exists():
                    raise FileExistsError(str(path)) from None
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a folder that cannot be opened for reading (some platforms)
        return path
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def atomic_write_text(path: str | Path, text: str, *, mode: int | None = None) -> Path:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def resolve_path(value: str | Path, roots: Iterable[str | Path] = ()) -> Path:
    """An absolute path for ``value`` (``~`` expanded): as is when absolute, else the first of
    ``roots`` under which it exists, else under the first root (the current folder when no
    root is given). A ``~user`` that names no user stays as written (and so names no file)."""
    path = Path(value)
    try:
        path = path.expanduser()
    except RuntimeError:  # no such user, or no home folder
        pass
    if path.is_absolute():
        return path
    roots = [Path(r) for r in roots]
    for root in roots:
        if (root / path).exists():
            return (root / path).resolve()
    return (roots[0] / path).resolve() if roots else path.resolve()


_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/-])(?:/[^\s'\"`,;:()\[\]{}<>|]+)+/?")
"""A POSIX absolute path inside a message: ``/`` not preceded by a word character, ``.``, ``~``,
``:`` (a URL) or ``-``, up to whitespace, a quote or punctuation that ends a path in a message."""


def redact_paths(text: str, root: str | Path | None = None) -> str:
    """``text`` with every absolute path made relative to ``root`` when it lies under ``root``,
    else reduced to its file name (``.../name``), so that a message can leave the machine
    without telling where its files are (e.g. an error reply to the coordinator).

    Args:
        text: a message, e.g. ``"/srv/site/data/c1_gt.nii.gz: mask labels [7] ..."``.
        root: the folder names are kept relative to (e.g. the site YAML's folder).

    Returns:
        e.g. ``"data/c1_gt.nii.gz: mask labels [7] ..."`` with ``root`` ``/srv/site``.
    """
    base = Path(os.path.abspath(root)) if root is not None else None
    if base is not None and base != Path(base.anchor):  # the root itself, even with spaces in it
        text = text.replace(f"{base}{os.sep}", "").replace(str(base), ".")

    def relative(match: re.Match) -> str:
        path = Path(os.path.normpath(match.group(0)))
        if base is not None:
            try:
                return path.relative_to(base).as_posix() or "."
            except ValueError:
                pass
        return f".../{path.name}" if path.name else "..."

    return _ABSOLUTE_PATH.sub(relative, text)
