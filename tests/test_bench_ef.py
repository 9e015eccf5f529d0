"""Tests of benchmarks.ef (`jras bench ef`): predicted against true ejection fraction on real ACDC cases."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from shared_data import SHARED, needs
from tiny_methods import train_acdc_site

from tools.cli import main

ACDC = SHARED / "acdc"


def _true_lv_ef(case: str) -> float:
    """LV EF of an ACDC case from its ground-truth files, by hand (label 1: LV)."""
    ml = {}
    for phase in ("ED", "ES"):
        img = nib.load(str(ACDC / f"{case}_{phase}_gt.nii.gz"))
        ml[phase] = int((np.rint(np.asarray(img.dataobj)) == 1).sum()) * float(np.prod(img.header.get_zooms()[:3]))
    return 100.0 * (ml["ED"] - ml["ES"]) / ml["ED"]


@pytest.mark.slow
@needs("acdc")
def test_bench_ef_reports_predicted_against_true_ejection_fraction(tmp_path: Path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        checkpoint, site = train_acdc_site(tmp_path, ACDC / "manifest.csv",
                                           ["patient001", "patient002", "patient061", "patient062"], val_fraction=0.25)
        out = tmp_path / "ef"
        assert main(["bench", "ef", "--checkpoint", str(checkpoint), "--site", str(site), "--out", str(out),
                     "--quiet", "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    with open(out / "ef.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1  # the site's one validation patient, ED and ES paired
    row = rows[0]
    assert row["case"] in {"patient001", "patient002", "patient061", "patient062"}
    assert float(row["lv_ef_true"]) == pytest.approx(_true_lv_ef(row["case"]), abs=0.006)
    assert float(row["lv_ef_abs_err"]) == pytest.approx(abs(float(row["lv_ef_pred"]) - float(row["lv_ef_true"])),
                                                        abs=0.011)
    report = (out / "ef.md").read_text()
    assert "| bank | 1 |" in report and "jras bench ef" in report
    assert "LV EF MAE" in capsys.readouterr().out
