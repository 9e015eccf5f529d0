"""Property-based tests of the entry points that read user input: the NIfTI and PNG
loaders, the YAML loader and the method, site and server configuration parsers.

Whatever the input, they either succeed or raise the project's own error
(``DataError`` / ``ConfigError``) with a one-line message naming the source; never
another exception type (which the CLI would show as a traceback).
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from jras_core.config import ConfigError, JRASConfig, load_yaml
from jras_core.data import DataError, load_image_folder, load_manifest
from jras_core.site import SiteConfig
from server.settings import ServerSettings

FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEADER = "case,phase,vendor,centre,image,mask\n"


def _nifti_bytes(data: np.ndarray) -> bytes:
    img = nib.Nifti1Image(data, np.diag([1.25, 1.25, 8.0, 1.0]))
    return img.to_bytes()


_GOOD_IMAGE = np.random.default_rng(0).normal(100, 10, (8, 8, 2)).astype(np.float32)
_GOOD_MASK = np.zeros((8, 8, 2), np.uint8)
_GOOD_MASK[2:5, 2:5] = 1
_IMAGE_BYTES = _nifti_bytes(_GOOD_IMAGE)
_PNG = io.BytesIO()
Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(_PNG, format="PNG")
_PNG_BYTES = _PNG.getvalue()


def _damage(data: bytes, cut: int | None, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data if cut is None else data[: cut % (len(data) + 1)])
    for pos, value in flips:
        if out:
            out[pos % len(out)] = value
    return bytes(out)


_damages = st.tuples(
    st.one_of(st.none(), st.integers(0, 10_000)),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
)


def _only_our_error(call, error: type[Exception], name: str) -> None:
    try:
        call()
    except error as exc:
        text = str(exc)
        assert name in text and "\n" not in text, text


@FEW
@given(damage=_damages)
def test_damaged_nifti_gives_data_error(damage):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "img.nii").write_bytes(_damage(_IMAGE_BYTES, *damage))
        (folder / "img_gt.nii").write_bytes(_nifti_bytes(_GOOD_MASK))
        (folder / "manifest.csv").write_text(HEADER + "c1,ED,A,1,img.nii,img_gt.nii\n")
        _only_our_error(lambda: load_manifest(folder / "manifest.csv", num_classes=4), DataError, "img.nii")


@FEW
@given(damage=_damages)
def test_damaged_png_gives_data_error(damage):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "scan.png").write_bytes(_damage(_PNG_BYTES, *damage))
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "scan_mask.png")
        _only_our_error(lambda: load_image_folder(folder, num_classes=2), DataError, "scan")


@FEW
@given(
    nan_at=st.one_of(st.none(), st.integers(0, 127)),
    labels=st.lists(st.integers(-2, 6), min_size=1, max_size=5),
    mask_shape=st.sampled_from([(8, 8, 2), (8, 7, 2), (8, 8, 1)]),
)
def test_volume_checks_match_the_data(nan_at, labels, mask_shape):
    """NaN intensities, labels outside 0..3 and image/mask shape mismatches are refused,
    naming the file; anything else loads."""
    image = _GOOD_IMAGE.copy()
    if nan_at is not None:
        image.flat[nan_at] = np.nan
    mask = np.zeros(mask_shape, np.int16)
    mask.flat[: len(labels)] = labels
    bad = nan_at is not None or mask_shape != image.shape or any(v < 0 or v > 3 for v in labels)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "img.nii").write_bytes(_nifti_bytes(image))
        (folder / "img_gt.nii").write_bytes(_nifti_bytes(mask))
        (folder / "manifest.csv").write_text(HEADER + "c1,ED,A,1,img.nii,img_gt.nii\n")
        try:
            vols = load_manifest(folder / "manifest.csv", num_classes=4)
        except DataError as exc:
            assert bad and "img" in str(exc), str(exc)
        else:
            assert not bad and np.array_equal(vols[0].mask, mask.astype(np.int64))


# --------------------------------------------------------------------------- configuration

_SECTIONS = list(JRASConfig().to_dict())
_FIELDS = sorted({f for section in JRASConfig().to_dict().values() for f in section})
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 300), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.sampled_from(["unet", "concat", "prior", "utility", "mask", "frozen", "flat"]),
)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6)


@FEW
@given(data=st.dictionaries(
    st.one_of(st.sampled_from(_SECTIONS), st.text(max_size=6)),
    st.one_of(_values, st.dictionaries(st.one_of(st.sampled_from(_FIELDS), st.text(max_size=6)), _values, max_size=4)),
    max_size=4,
))
def test_method_config_parser_only_raises_config_error(data):
    try:
        cfg = JRASConfig.from_dict(data, source="fuzz.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.yaml") or "unknown" in str(exc), str(exc)
    else:
        assert JRASConfig.from_dict(cfg.to_dict()) == cfg


@FEW
@given(text=st.one_of(
    st.text(max_size=80),
    st.lists(st.sampled_from(["train:", "  epochs: 2", "- a", "[", "]", "{", "key: [1, 2", ": x", "\t", "'"]),
             max_size=6).map("\n".join),
))
def test_yaml_loader_only_raises_config_error(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "any.yaml"
        path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
        try:
            data = load_yaml(path)
        except ConfigError as exc:
            assert "any.yaml" in str(exc) and "\n" not in str(exc), str(exc)
        else:
            assert isinstance(data, dict)


@FEW
@given(data=st.dictionaries(
    st.sampled_from(["name", "vendor", "val_fraction", "split_seed", "support_cases", "cache_dir", "data", "colour"]),
    st.one_of(_values, st.dictionaries(
        st.sampled_from(["kind", "path", "vendor", "cases", "seed", "size", "label_map", "skip_bad", "nope"]),
        _values, max_size=4)),
    max_size=6,
))
def test_site_config_parser_only_raises_config_error(data):
    with tempfile.TemporaryDirectory() as tmp:
        try:
            SiteConfig.from_dict(data, source="site.yaml", root=Path(tmp))
        except ConfigError as exc:
            assert "site.yaml" in str(exc), str(exc)


@FEW
@given(data=st.dictionaries(st.sampled_from(sorted(ServerSettings.KEYS) + ["other"]), _scalars, max_size=6))
def test_server_settings_only_raise_config_error(data):
    try:
        settings_ = ServerSettings.from_run_config(data)
    except ConfigError as exc:
        assert str(exc).startswith("run config: "), str(exc)
    else:
        settings_.validate()
