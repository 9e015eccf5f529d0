"""The `jras` command line end to end on tiny synthetic data."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jras_core.data.loaders import load_manifest
from jras_core.retrieval.bank import RetrievalBank
from tools.cli import main

TINY = ["--set", "preprocess.size=32", "--set", "segmenter.channels=[8,16,32]",
        "--set", "retriever.channels=[8,16]", "--set", "retriever.embed_dim=16"]


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "tools.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("train", "eval", "predict", "bank", "data", "demo"):
        assert cmd in out.stdout


def test_demo_rejects_bad_arguments_before_starting_flower(tmp_path: Path, capsys):
    assert main(["demo", "--local-epochs", "0", "--out", str(tmp_path / "demo")]) == 2
    assert "--local-epochs must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_data_synth_writes_a_manifest_the_real_loader_reads(tmp_path: Path):
    assert main(["data", "synth", "--vendor", "A,D", "--cases", "2", "--size", "32", "--out", str(tmp_path)]) == 0
    vols = load_manifest(tmp_path / "manifest.csv", num_classes=4)
    assert {v.vendor for v in vols} == {"A", "D"}
    assert len(vols) == 2 * 2 * 2  # vendors x cases x phases
    assert all(v.image.shape[:2] == (32, 32) for v in vols)


@pytest.mark.slow
def test_train_eval_bank_build(tmp_path: Path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--synthetic", "A,D", "--cases", "3", "--holdout", "D", "--support", "1",
               "--set", "train.epochs=1", *TINY, "--out", str(out), "--quiet"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["sites"]) == {"synthetic-A", "synthetic-D"}
    assert 0.0 <= metrics["sites"]["synthetic-D"]["dice_mean"] <= 1.0
    assert "guide_dice" in metrics["sites"]["synthetic-D"]
    assert list((out / "tb").glob("events.out.tfevents.*"))
    printed = capsys.readouterr().out
    assert "synthetic-D" in printed and "dice_mean" in printed

    assert main(["eval", "--checkpoint", str(out / "model.pt"), "--synthetic", "A", "--cases", "3",
                 "--out", str(tmp_path / "eval.json")]) == 0
    assert "synthetic-A" in json.loads((tmp_path / "eval.json").read_text())

    assert main(["bank", "build", "--checkpoint", str(out / "model.pt"), "--synthetic", "A", "--cases", "3",
                 "--out", str(tmp_path / "bank")]) == 0
    bank = RetrievalBank.load(tmp_path / "bank")
    assert len(bank) > 0 and bank.embeddings.shape == (len(bank), 16)


@pytest.mark.slow
def test_a_site_of_one_case_trains_and_is_reported_as_not_evaluated(tmp_path: Path, capsys):
    """A manifest of a single case trains (its one case cannot also validate) and the
    command says so instead of failing after training."""
    assert main(["data", "synth", "--vendor", "A", "--cases", "1", "--size", "32", "--out", str(tmp_path / "one")]) == 0
    out = tmp_path / "run"
    assert main(["train", "--manifest", str(tmp_path / "one" / "manifest.csv"), "--set", "train.epochs=1", *TINY,
                 "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "site manifest: no validation cases: the site has 1 case" in printed and "not evaluated" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sites"] == {} and "has 1 case" in metrics["not_evaluated"]["manifest"]
    assert (out / "model.pt").is_file()
    assert main(["eval", "--checkpoint", str(out / "model.pt"), "--manifest", str(tmp_path / "one" / "manifest.csv"),
                 "--out", str(tmp_path / "eval.json")]) == 0
    assert "not evaluated" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval.json").read_text()) == {}


def test_cli_reports_bad_input_clearly(tmp_path: Path, capsys):
    bad = tmp_path / "site.yaml"
    bad.write_text("name: x\ndata:\n  kind: manifest\n  path: nowhere.csv\n")
    assert main(["train", "--site", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "site.yaml" in err and "nowhere.csv" in err
    assert main(["train", "--synthetic", "A", "--set", "train.epoch=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--bogus-flag"])
