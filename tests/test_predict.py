"""Tests of jras_core.predict and `jras predict`: inputs, masks on the input's grid, overlays,
measurements, and bad inputs skipped or stopping the run, on the real ACDC and M&Ms fixtures."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from shared_data import SHARED, needs
from tiny_methods import TINY, train_acdc_site

from jras_core.checkpoint import save_model
from jras_core.config import JRASConfig
from jras_core.data.volume import DataError
from jras_core.measures import measure_volume
from jras_core.models.jras import build_model
from jras_core.predict import collect_inputs, describe_file, mask_image, write_mask
from tools.cli import main

ACDC = SHARED / "acdc"
MNMS = SHARED / "mnms-sample"


def _nifti(path: Path, shape=(8, 6, 3), affine=None) -> Path:
    data = np.arange(int(np.prod(shape)), dtype=np.int16).reshape(shape)
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 8.0, 1.0]) if affine is None else affine), str(path))
    return path


# --------------------------------------------------------------------------- inputs


def test_case_and_phase_come_from_the_names_the_fixtures_use(tmp_path: Path):
    assert describe_file(tmp_path / "patient001_ED.nii.gz") == describe_file(tmp_path / "patient001_ED.nii.gz")
    one = describe_file(tmp_path / "patient001_ES.nii.gz")
    assert (one.case, one.phase, one.phase_source) == ("patient001", "ES", "file name")
    mnms = describe_file(tmp_path / "H1N8S6_sa_ED.nii.gz")
    assert (mnms.case, mnms.phase) == ("H1N8S6", "ED")
    (tmp_path / "Info.cfg").write_text("ED: 1\nES: 12\nGroup: DCM\n")
    frame = describe_file(tmp_path / "patient001_frame12.nii.gz")
    assert (frame.case, frame.phase, frame.phase_source) == ("patient001", "ES", "Info.cfg")
    unknown = describe_file(tmp_path / "patient001_frame05.nii.gz")
    assert (unknown.case, unknown.phase) == ("patient001", "")
    plain = describe_file(tmp_path / "scan.nii")
    assert (plain.case, plain.phase, plain.stem) == ("scan", "", "scan")


def test_collect_inputs_from_folders_manifests_and_files(tmp_path: Path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for name in ("b_ES.nii.gz", "b_ED.nii.gz", "b_ED_gt.nii.gz", "sub/a_ED.nii", "a_ED_seg.nii.gz"):
        _nifti(folder / name)
    (folder / "notes.txt").write_text("not an image")
    got = collect_inputs([folder])
    assert [p.path.name for p in got] == ["b_ED.nii.gz", "b_ES.nii.gz", "a_ED.nii"]  # label maps skipped
    manifest = tmp_path / "list.csv"
    manifest.write_text("case,phase,image,mask\nP1,es,in/b_ED.nii.gz,in/b_ED_gt.nii.gz\nP1,,in/b_ES.nii.gz,\n")
    rows = collect_inputs([manifest])
    assert [(r.case, r.phase, r.phase_source) for r in rows] == [("P1", "ES", "manifest"), ("P1", "ES", "file name")]
    # a file named twice is one input; inputs of one case stay together
    again = collect_inputs([folder / "b_ED.nii.gz", folder / "sub" / "a_ED.nii", folder / "b_ES.nii.gz",
                            folder / "b_ED.nii.gz"])
    assert [p.path.name for p in again] == ["b_ED.nii.gz", "b_ES.nii.gz", "a_ED.nii"]


def test_collect_inputs_names_what_is_wrong(tmp_path: Path):
    with pytest.raises(DataError, match="nowhere: no such file or folder"):
        collect_inputs([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no NIfTI image"):
        collect_inputs([tmp_path / "empty"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="notes.txt: not a NIfTI image"):
        collect_inputs([tmp_path / "notes.txt"])
    (tmp_path / "m.csv").write_text("case,mask\nA,a_gt.nii.gz\n")
    with pytest.raises(DataError, match="m.csv: manifest has no 'image' column"):
        collect_inputs([tmp_path / "m.csv"])
    (tmp_path / "x").mkdir()
    _nifti(tmp_path / "x" / "scan.nii.gz")
    _nifti(tmp_path / "scan.nii.gz")
    with pytest.raises(DataError, match="two inputs named scan"):
        collect_inputs([tmp_path / "x" / "scan.nii.gz", tmp_path / "scan.nii.gz"])


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("shape", [(8, 6), (8, 6, 3), (8, 6, 3, 1)])
def test_written_mask_has_the_input_grid(tmp_path: Path, shape: tuple[int, ...]):
    affine = np.array([[0.0, -1.2, 0.0, 10.0], [1.3, 0.0, 0.0, -4.0], [0.0, 0.0, 7.0, 2.5], [0, 0, 0, 1]])
    data = np.random.default_rng(0).normal(500, 50, size=shape).astype(np.float32)
    src = nib.Nifti1Image(data, affine)
    src.header.set_slope_inter(2.0, 5.0)  # scaled intensities must not scale the labels
    nib.save(src, str(tmp_path / "img.nii.gz"))
    like = nib.load(str(tmp_path / "img.nii.gz"))
    labels = np.random.default_rng(1).integers(0, 4, size=(8, 6, shape[2] if len(shape) > 2 else 1))
    path = write_mask(tmp_path / "out" / "img_seg.nii.gz", labels, like)
    with gzip.open(path) as fh:
        fh.read(1)  # a real gzip stream
    back = nib.load(str(path))
    assert back.shape == like.shape
    np.testing.assert_allclose(back.affine, like.affine)
    np.testing.assert_allclose(back.header.get_zooms(), like.header.get_zooms())
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(back.dataobj).reshape(labels.shape), labels)
    assert mask_image(labels, like).header["sform_code"] == like.header["sform_code"]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary left


# --------------------------------------------------------------------------- `jras predict` end to end


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """An untrained tiny J-RAS model's checkpoint (for what needs no trained weights)."""
    cfg = JRASConfig().with_overrides({**TINY, "retrieval.test_passes": 2})
    torch.manual_seed(0)
    return save_model(tmp_path / "model.pt", build_model(cfg), cfg)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Torch on one thread for this module's training and predictions (faster on a few shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny model trained for a few seconds on three ACDC patients, its site's bank."""
    return train_acdc_site(tmp_path_factory.mktemp("trained"), ACDC / "manifest.csv",
                           ["patient001", "patient002", "patient061"])


def _bad(tmp_path: Path) -> Path:
    """A truncated NIfTI file."""
    data = (ACDC / "patient004_ED.nii.gz").read_bytes()
    bad = tmp_path / "broken_ED.nii.gz"
    bad.write_bytes(data[: len(data) // 3])
    return bad


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "measurements.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
@needs("acdc", "mnms-sample")
def test_predict_writes_masks_on_the_input_grid_overlays_and_measurements(tmp_path: Path, trained, capsys):
    checkpoint, site = trained
    out = tmp_path / "out"
    inputs = [ACDC / "patient003_ED.nii.gz", _bad(tmp_path), ACDC / "patient003_ES.nii.gz",
              MNMS / "C8O0P2_sa_ES.nii.gz"]
    rc = main(["predict", *map(str, inputs), "--checkpoint", str(checkpoint), "--site", str(site),
               "--out", str(out), "--quiet", "--device", "cpu"])
    assert rc == 1  # one input skipped
    err = capsys.readouterr().err
    assert "skipped" in err and "broken_ED.nii.gz" in err and "unreadable or truncated" in err
    for image in (inputs[0], inputs[2], inputs[3]):
        src = nib.load(str(image))
        mask = nib.load(str(out / "masks" / f"{image.name[:-len('.nii.gz')]}_seg.nii.gz"))
        assert mask.shape == src.shape
        np.testing.assert_allclose(mask.affine, src.affine)
        np.testing.assert_allclose(mask.header.get_zooms(), src.header.get_zooms())
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2, 3}
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["C8O0P2.png", "patient003.png"]
    assert (out / "overlays" / "patient003.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _rows(out)
    assert [(r["case"], r["phase"], r["phase_rule"]) for r in rows] == [
        ("patient003", "ED", "metadata"), ("patient003", "ES", "metadata"), ("C8O0P2", "ES", "")]
    for row in rows:  # the table measures the written masks
        mask = nib.load(str(out / row["mask"]))
        m = measure_volume(np.asarray(mask.dataobj), mask.header.get_zooms()[:3], ["LV", "MYO", "RV"])
        assert float(row["lv_ml"]) == pytest.approx(m.lv_ml, abs=0.006)
        assert float(row["myo_mass_g"]) == pytest.approx(m.myo_mass_g, abs=0.006)
    ed, es = rows[0], rows[1]
    assert ed["lv_ef_pct"] == es["lv_ef_pct"] and rows[2]["lv_ef_pct"] == ""
    edv, esv = float(ed["lv_ml"]), float(es["lv_ml"])
    assert edv > 0 and esv > 0  # the trained model finds the left ventricle
    assert float(ed["lv_ef_pct"]) == pytest.approx(100 * (edv - esv) / edv, abs=0.02)
    assert float(ed["lv_sv_ml"]) == pytest.approx(edv - esv, abs=0.011)
    assert not [p for p in out.rglob(".*")]  # only complete files


@pytest.mark.slow
@needs("acdc", "mnms-sample")
def test_predict_stops_at_a_bad_input_and_keeps_what_it_wrote(tmp_path: Path, trained, capsys):
    checkpoint, site = trained
    scans = tmp_path / "scans"  # names that say nothing of the phase: ED/ES by the larger LV
    scans.mkdir()
    (scans / "visit1.nii.gz").symlink_to(ACDC / "patient003_ES.nii.gz")
    (scans / "visit2.nii.gz").symlink_to(ACDC / "patient003_ED.nii.gz")
    manifest = tmp_path / "scans.csv"  # a manifest without masks or phases
    manifest.write_text(f"case,image\nP3,scans/visit1.nii.gz\nP3,scans/visit2.nii.gz\n"
                        f"X,{_bad(tmp_path)}\nM,{MNMS / 'C8O0P2_sa_ED.nii.gz'}\n")
    out = tmp_path / "out"
    rc = main(["predict", str(manifest), "--checkpoint", str(checkpoint), "--site", str(site),
               "--out", str(out), "--quiet", "--on-error", "stop", "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "stopped at" in err and "broken_ED.nii.gz" in err
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["visit1_seg.nii.gz", "visit2_seg.nii.gz"]
    rows = _rows(out)
    assert [r["case"] for r in rows] == ["P3", "P3"]
    assert {r["phase_rule"] for r in rows} == {"larger LV volume"}
    lv = {r["phase"]: float(r["lv_ml"]) for r in rows}
    assert set(lv) == {"ED", "ES"} and lv["ED"] > lv["ES"] > 0
    assert (out / "overlays" / "P3.png").is_file()
    assert not (out / "overlays" / "M.png").exists()
    assert not [p for p in out.rglob(".*")]


def test_a_retrieval_checkpoint_without_a_site_is_refused(tmp_path: Path, tiny_checkpoint: Path, capsys):
    image = _nifti(tmp_path / "scan_ED.nii.gz")
    rc = main(["predict", str(image), "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "--site" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
