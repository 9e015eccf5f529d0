"""Configured data sources: where a site's volumes come from.

A :class:`DataSourceConfig` names one source (synthetic vendor, manifest CSV,
official M&Ms or ACDC layout, or a 2-D image folder); :func:`load_volumes`
reads it into a list of :class:`~jras_core.data.volume.Volume`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, StrictInt, StrictStr, ValidationInfo, field_validator

from jras_core.config import ConfigError, config_class, validate_as
from jras_core.data import loaders
from jras_core.data.volume import DataError, Volume
from jras_core.files import resolve_path

FILE_KINDS: tuple[str, ...] = ("manifest", "mnms", "acdc", "folder")
"""Source kinds that read files from ``path``."""


@config_class
class DataSourceConfig:
    """One data source.

    Attributes:
        kind: ``synthetic`` (generated vendor), ``manifest`` (CSV of NIfTI pairs),
            ``mnms`` / ``acdc`` (official layouts) or ``folder`` (2-D image/mask folder).
        path: manifest CSV (``manifest``) or root folder (``mnms``, ``acdc``, ``folder``).
        info_csv: M&Ms info CSV with vendor, centre and ED/ES frames (``mnms``).
        vendor: synthetic vendor name; vendor filter for ``manifest``/``mnms``;
            vendor label for ``acdc``/``folder``.
        where: row filter of a ``manifest``: ``{column: value or [values]}`` keeps the
            rows whose value in each named column is listed, e.g. ``{group: [DCM]}`` or
            ``{case: [patient001, patient002]}``.
        exclude: row filter of a ``manifest``: ``{column: value or [values]}`` drops the
            rows whose value is listed, e.g. ``{case: [patient017, patient018]}``.
            ``vendor``, ``where`` and ``exclude`` combine with AND; a column the
            manifest lacks, a value no row holds, or filters that keep no row are errors.
        vendor_spec: custom synthetic vendor parameters (``synthetic``).
        cases: number of synthetic cases.
        seed: synthetic generator seed.
        size: synthetic image matrix side, pixels.
        label_map: ``{old: new}`` mask label remap; for ``acdc`` the default is
            ACDC -> M&Ms and ``{}`` keeps the ACDC labels.
        skip_bad: skip bad cases with a warning instead of failing.
        max_volume_mib: the largest volume (one image or mask file) read, in MiB as read
            (float64 voxels); a file whose header declares more is refused before its data
            is read, naming the file, its shape and the limit.

    Types, ranges and the shapes of ``where``, ``exclude`` and ``label_map`` are checked
    when the config is made; :meth:`validate` checks that the source is complete and that
    its files exist.
    """

    kind: Literal["synthetic", "manifest", "mnms", "acdc", "folder"] = "synthetic"
    path: StrictStr | None = None
    info_csv: StrictStr | None = None
    vendor: StrictStr | None = None
    where: dict | None = None
    exclude: dict | None = None
    vendor_spec: dict | None = None
    cases: Annotated[StrictInt, Field(ge=1)] = 20
    seed: StrictInt = 0
    size: Annotated[StrictInt, Field(ge=16)] = 128
    label_map: dict | None = None
    skip_bad: StrictBool = False
    max_volume_mib: Annotated[StrictInt, Field(ge=1)] = loaders.MAX_VOLUME_MIB

    @field_validator("where", "exclude")
    @classmethod
    def _manifest_filter(cls, value: dict | None, info: ValidationInfo) -> dict | None:
        if value is not None:
            _row_filter(value)
            kind = info.data.get("kind")
            if kind is not None and kind != "manifest":
                raise ValueError(f"filters manifest rows; kind {kind!r} has none")
        return value

    @field_validator("label_map")
    @classmethod
    def _integer_labels(cls, value: dict | None) -> dict | None:
        if value is not None:
            _label_pairs(value)
        return value

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "<dict>") -> DataSourceConfig:
        """Build and validate from a mapping (e.g. a YAML section)."""
        cfg = validate_as(cls, data, source)
        cfg.validate(source=source)
        return cfg

    def label_mapping(self) -> dict[int, int] | None:
        """``label_map`` with integer keys and values (YAML may give strings)."""
        if self.label_map is None:
            return None
        try:
            return _label_pairs(self.label_map)
        except ValueError as exc:
            raise ConfigError(f"data source: label_map: {exc}") from None

    def row_filters(self) -> tuple[dict[str, list[str]] | None, dict[str, list[str]] | None]:
        """``where`` and ``exclude`` checked and normalised to ``{column: [values as strings]}``."""
        try:
            return (
                _row_filter(self.where) if self.where is not None else None,
                _row_filter(self.exclude) if self.exclude is not None else None,
            )
        except ValueError as exc:
            raise ConfigError(f"data source: where/exclude: {exc}") from None

    def resolve(self, value: str, root: Path | None) -> Path:
        """A configured path, made absolute against ``root`` when relative."""
        return resolve_path(value, [root] if root is not None else [])

    def validate(self, root: Path | None = None, source: str = "data source", prefix: str = "") -> None:
        """Raise :class:`ConfigError` if the source is incomplete or points nowhere.

        Args:
            root: folder that relative paths are resolved against (``None``: the
                current directory).
            source: what errors name first (e.g. the site YAML).
            prefix: the dotted key of this source in ``source`` (e.g. ``"data."``).
        """
        validate_as(type(self), dataclasses.asdict(self), source)  # values changed in place

        def bad(key: str, problem: str) -> ConfigError:
            return ConfigError(f"{source}: {prefix}{key}: {problem}")

        if self.kind == "synthetic":
            if not self.vendor and not self.vendor_spec:
                raise bad("vendor", "a synthetic data source needs 'vendor' (a vendor name) or 'vendor_spec'")
            return
        if not self.path:
            what = "manifest CSV" if self.kind == "manifest" else "root folder"
            raise bad("path", f"a {self.kind} data source needs 'path' (the {what})")
        path = self.resolve(self.path, root)
        if self.kind == "manifest":
            if not path.is_file():
                raise bad("path", f"manifest file {path} does not exist")
            where, exclude = self.row_filters()
            if where is not None or exclude is not None:
                try:
                    loaders.select_manifest_rows(
                        path, [self.vendor] if self.vendor else None, where, exclude
                    )
                except DataError as exc:
                    raise bad("where" if where is not None else "exclude", str(exc)) from None
        elif not path.is_dir():
            raise bad("path", f"folder {path} does not exist")
        if self.kind == "mnms":
            if not self.info_csv:
                raise bad(
                    "info_csv", "an mnms data source needs 'info_csv' (the M&Ms dataset information CSV)"
                )
            info = self.resolve(self.info_csv, root)
            if not info.is_file():
                raise bad("info_csv", f"info CSV {info} does not exist")


def _row_filter(spec: Any) -> dict[str, list[str]]:
    """A ``where``/``exclude`` mapping as ``{column: [values]}``; a bad shape raises ValueError."""
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError(f"must be a non-empty mapping {{column: value or [values]}}, got {spec!r}")
    out: dict[str, list[str]] = {}
    for column, value in spec.items():
        if not isinstance(column, str) or not column.strip():
            raise ValueError(f"column names must be text, got {column!r}")
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, bool):
                raise ValueError(
                    f"{column}: {v!r} was read as a YAML boolean; quote the value (e.g. 'NO')"
                )
            if v is None or isinstance(v, (Mapping, list, tuple)):
                raise ValueError(f"{column}: values must be text or numbers, got {v!r}")
        out[column] = [str(v).strip() for v in values]
    return out


def _label_pairs(spec: Mapping[Any, Any]) -> dict[int, int]:
    """A ``label_map`` with integer keys and values; an entry that is none raises ValueError."""
    out: dict[int, int] = {}
    for old, new in spec.items():
        try:
            out[_as_label(old)] = _as_label(new)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"entries must be non-negative integers, got {old!r}: {new!r}") from None
    return out


def _as_label(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(value)
    number = int(value)
    if number < 0 or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(value)
    return number


def source_files(src: DataSourceConfig, root: Path | None = None) -> list[Path]:
    """The files a data source reads, sorted (none for a synthetic source, which its config
    determines): a manifest and the image and mask files of the rows its filters keep; an
    M&Ms info CSV and the NIfTI files under its root; an ACDC root's ``Info.cfg`` and NIfTI
    files; an image folder's pictures. Files that do not exist are left out (reading them
    reports them)."""
    if src.kind == "synthetic":
        return []
    path = src.resolve(src.path, root)
    files: set[Path] = set()
    if src.kind == "manifest":
        files.add(path)
        where, exclude = src.row_filters()
        rows = loaders.select_manifest_rows(path, [src.vendor] if src.vendor else None, where, exclude)
        for _, row in rows:
            for col in ("image", "mask"):
                if row[col] and "\x00" not in row[col]:
                    files.add(resolve_path(row[col], [path.parent]))
    elif src.kind in ("mnms", "acdc"):
        files.update(path.rglob("*.nii.gz"))
        files.update(path.rglob("*.nii"))
        if src.kind == "mnms":
            files.add(src.resolve(src.info_csv, root))
        else:
            files.update(path.rglob("Info.cfg"))
    elif src.kind == "folder":
        files.update(p for p in path.iterdir() if p.suffix.lower() in loaders.IMAGE_SUFFIXES)
    return sorted(p for p in files if p.is_file())


def source_digest(src: DataSourceConfig, root: Path | None = None) -> str:
    """SHA-256 (hex) of the source's config and of the path and bytes of every file it reads
    (:func:`source_files`): it changes when any of those files is edited, added or removed,
    so that data derived from the source (a site's store) can be keyed by it."""
    digest = hashlib.sha256(repr(sorted(dataclasses.asdict(src).items(), key=str)).encode())
    for path in source_files(src, root):
        digest.update(str(path).encode() + b"\0")
        with open(path, "rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()


def load_volumes(
    src: DataSourceConfig, num_classes: int, root: Path | None = None, stream: bool = False
) -> list[Volume] | Iterable[Volume]:
    """Read the volumes of a data source.

    Args:
        src: the source.
        num_classes: number of classes including background (mask labels are checked).
        root: folder that relative paths are resolved against.
        stream: return an iterable that reads each file when it is reached
            (:class:`~jras_core.data.loaders.common.VolumeStream`; a synthetic source, made
            in memory at its final size, is generated whole) instead of a list of every
            volume, so that a site preprocesses one volume at a time.

    Returns:
        Volumes with image ``(H, W, Z)`` float32 and mask ``(H, W, Z)`` int64.
    """
    src.validate(root)
    label_map = src.label_mapping()
    if src.kind == "synthetic":
        from jras_core.data.synthetic import generate_volumes

        volumes = generate_volumes(
            src.vendor_spec or src.vendor, src.cases, src.seed, size=src.size
        )
        if label_map:
            for vol in volumes:
                vol.mask = loaders.remap_labels(vol.mask, label_map)
        return volumes
    path = src.resolve(src.path, root)
    vendors = [src.vendor] if src.vendor else None
    if src.kind == "manifest":
        where, exclude = src.row_filters()
        return loaders.load_manifest(
            path,
            num_classes,
            label_map,
            skip_bad=src.skip_bad,
            vendors=vendors,
            where=where,
            exclude=exclude,
            max_volume_mib=src.max_volume_mib,
            stream=stream,
        )
    if src.kind == "mnms":
        return loaders.load_mnms(
            path,
            src.resolve(src.info_csv, root),
            num_classes,
            label_map,
            skip_bad=src.skip_bad,
            vendors=vendors,
            max_volume_mib=src.max_volume_mib,
            stream=stream,
        )
    if src.kind == "acdc":
        return loaders.load_acdc(
            path,
            num_classes,
            loaders.ACDC_TO_MNMS if label_map is None else label_map,
            skip_bad=src.skip_bad,
            vendor=src.vendor or "ACDC",
            max_volume_mib=src.max_volume_mib,
            stream=stream,
        )
    if src.kind == "folder":
        return loaders.load_image_folder(
            path, num_classes, vendor=src.vendor or "", label_map=label_map, skip_bad=src.skip_bad,
            max_volume_mib=src.max_volume_mib,
            stream=stream,
        )
    raise DataError(f"unknown data source kind {src.kind!r}")
