"""The real-data benchmark: its method table and option parsing, the report's arithmetic and
target lines from a synthetic results.csv, the per-volume table, a missing fixture, and
``jras bench real`` end to end on the real fixtures (one small Simulation Engine federation)."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from shared_data import needs

from benchmarks import real, shift
from jras_core.config import ConfigError
from jras_core.site import SiteConfig
from tools.cli import build_parser
from tools.cli import main as jras_main

PROJECT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["segmenter.channels=[4, 8, 16]", "retriever.channels=[4, 8]", "retriever.embed_dim=8",
        "train.batch_size=32", "contrastive.steps_per_epoch=1"]

needs_data = needs()


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- methods and options


def test_method_table_shares_training_runs(tmp_path):
    m = real.METHODS
    assert list(m) == ["central", "fedavg+aug", "fedavg+aug+adabn", "fedavg+aug+ft", "fedbn", "jras-fedavg",
                       "jras-fedavg+ft"]
    assert m["fedavg+aug"].overrides["adapt.norm_stats"] is False
    assert m["fedavg+aug+adabn"].overrides["adapt.norm_stats"] is True
    assert "adapt.norm_stats" not in m["jras-fedavg"].overrides  # the config's default (on)
    assert m["central"].kind == "central" and not m["central"].uses_retrieval
    # AdaBN and fine-tuning change no training: one federation, one run folder
    for variant, base in (("fedavg+aug+adabn", "fedavg+aug"), ("fedavg+aug+ft", "fedavg+aug"),
                          ("jras-fedavg+ft", "jras-fedavg")):
        assert m[variant].trains_as == base and m[variant].training_key == m[base].training_key
    assert m["fedavg+aug"].training_key != m["jras-fedavg"].training_key != m["fedbn"].training_key
    assert m["jras-fedavg+ft"].finetune and m["jras-fedavg+ft"].uses_retrieval
    # the shift benchmark's own methods are unchanged
    assert shift.METHODS["fedavg+aug"].overrides == shift.AUGMENTED and shift.METHODS["fedavg+aug+ft"].trains_as is None

    st = shift.Settings(PROJECT / "configs" / "real.yaml", {}, 1, 1, 32, 0, 1, tmp_path, run_prefix="")
    assert st.run_dir(m["fedavg+aug+adabn"], "group", 2) == st.run_dir(m["fedavg+aug"], "group", 2) == (
        tmp_path / "runs" / "fedavg+aug" / "group-s2")

    # brackets: a training option trains anew, an inference option shares the base's (or its base's) run
    k1, passes, ft_passes = shift.parse_methods(
        "jras-fedavg[retrieval.k=1],jras-fedavg[retrieval.test_passes=1],jras-fedavg+ft[retrieval.test_passes=1]",
        real.METHODS)
    assert k1.name == "jras-fedavg[retrieval.k=1]" and k1.trains_as is None
    assert k1.overrides["retrieval.k"] == 1 and k1.training_key != m["jras-fedavg"].training_key
    assert passes.trains_as == ft_passes.trains_as == "jras-fedavg" and ft_passes.finetune
    with pytest.raises(ConfigError, match="unknown 'fedprox'"):
        shift.parse_methods("fedprox", real.METHODS)

    # methods that share a run are placed next to each other, the first of each run leading
    order = real.order_by_training(shift.parse_methods("jras-fedavg,fedavg+aug+adabn,central,jras-fedavg+ft,"
                                                       "fedavg+aug", real.METHODS))
    assert [x.name for x in order] == ["jras-fedavg", "jras-fedavg+ft", "fedavg+aug+adabn", "fedavg+aug", "central"]


def test_command_line_options(tmp_path, capsys):
    args = build_parser().parse_args(["bench", "real", "--quick", "--set", "retrieval.k=1", "--device", "cpu"])
    assert args.func.__name__ == "cmd_bench_real" and args.quick and args.split is None
    shift.fill_options(args, real.DEFAULTS, real.QUICK, "demo.yaml")
    assert (args.methods, args.seeds, args.rounds, args.local_epochs, args.size, args.cases, args.out) == (
        "fedavg+aug,jras-fedavg", "0", 1, 1, 32, 2, "runs/bench-real-quick")
    assert args.split == "group" and args.config == "demo.yaml"
    full = build_parser().parse_args(["bench", "real", "--rounds", "3"])
    shift.fill_options(full, real.DEFAULTS, real.QUICK)
    assert (full.rounds, full.local_epochs, full.seeds, full.size, full.cases, full.out) == (
        3, 2, "0,1,2", None, None, "runs/bench-real")  # size: the config's, read in run()
    assert full.methods.split(",") == real.DEFAULT_METHODS
    assert shift.reproduce_command(["--fresh", "--split", "random"], "real") == "jras bench real --split random"

    assert jras_main(["bench", "real", "--methods", "fedavg,magic", "--out", str(tmp_path)]) == 2
    assert "unknown 'fedavg'" in capsys.readouterr().err
    assert jras_main(["bench", "real", "--quick", "--cases", "1", "--out", str(tmp_path)]) == 2
    assert "--cases must be >= 2" in capsys.readouterr().err
    assert jras_main(["bench", "real", "--report-only", "--out", str(tmp_path / "none")]) == 2
    assert "results.csv not found" in capsys.readouterr().err

    assert shift.interrupted("real", tmp_path / "results.csv") == 130
    assert "jras bench real: interrupted" in capsys.readouterr().err


def test_a_missing_fixture_is_named_in_one_line(tmp_path, monkeypatch, capsys):
    sites = tmp_path / "project" / "sites"
    shutil.copytree(PROJECT / "sites", sites)  # ../../shared/data from here does not exist
    monkeypatch.setattr(real, "SITES_DIR", sites)
    assert jras_main(["bench", "real", "--quick", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    missing = tmp_path / "shared" / "data" / "acdc" / "manifest.csv"
    assert err.count("\n") == 0 and err.startswith(f"jras: error: {missing} not found")
    assert "acdc-DCM.yaml" in err and not (tmp_path / "out" / "results.csv").exists()


# --------------------------------------------------------------------------- report


def _synthetic_rows() -> tuple[list[dict], list[dict]]:
    """results.csv and cases.csv rows of two seeds: the numbers the report test checks."""
    dice = {  # method: site: per seed
        "central": {"acdc-test": (0.92, 0.92), "unseen-lge": (0.5, 0.5), "unseen-mnms-B": (0.5, 0.5),
                    "unseen-mnms-C": (0.5, 0.5)},
        "fedavg+aug": {"acdc-test": (0.86, 0.88), "unseen-lge": (0.6, 0.6), "unseen-mnms-B": (0.7, 0.7),
                       "unseen-mnms-C": (0.5, 0.5)},
        "fedavg+aug+adabn": {"acdc-test": (0.895, 0.905), "unseen-lge": (0.62, 0.62), "unseen-mnms-B": (0.72, 0.72),
                             "unseen-mnms-C": (0.52, 0.52)},
        "jras-fedavg": {"acdc-test": (0.85, 0.87), "unseen-lge": (0.70, 0.66), "unseen-mnms-B": (0.80, 0.78),
                        "unseen-mnms-C": (0.50, 0.52)},
    }
    rows, cases = [], []
    for method, per_site in dice.items():
        for seed in (0, 1):
            common = {"method": method, "split": "group", "seed": str(seed), "wall_s": str(100 + 2 * seed),
                      "eval_s": "20", "bytes_per_round": "2000000", "peak_rss_mb": "700"}
            for site, values in per_site.items():
                d = values[seed]
                extra = {"guide_dice": "0.5", "dice_oracle": "0.9", "dice_random": "0.4",
                         "guides_used": str(1 - seed * (site == "unseen-lge"))} if "jras" in method else {}
                rows.append({**common, "site": site, "role": "heldout", "dice_mean": str(d), "dice_lv": str(d),
                             "dice_myo": str(d), "dice_rv": str(d), "hd95_mean": "5",
                             "evaluated_cases": "1" if "mnms" in site else "16", **extra})
            for site, d in (("acdc-DCM", 0.8), ("acdc-HCM", 0.9)):
                rows.append({**common, "site": site, "role": "train", "dice_mean": str(d)})
            for phase, d in (("ED", (0.8, 0.7)), ("ES", (0.6, 0.5))):
                cases.append({"method": method, "split": "group", "seed": str(seed), "site": "unseen-mnms-B",
                              "case": "P1", "phase": phase, "dice_mean": str(d[seed]), "dice_lv": str(d[seed]),
                              "dice_myo": "", "dice_rv": "0.4"})
    return rows, cases


def test_report_tables_and_targets(tmp_path):
    rows, cases = _synthetic_rows()
    methods = shift.parse_methods("central,fedavg+aug,fedavg+aug+adabn,jras-fedavg,fedbn", real.METHODS)
    assert real.seed_values(rows, "jras-fedavg", list(real.UNSEEN)) == pytest.approx([2.0 / 3, 1.96 / 3])
    assert real.seed_values(rows, "jras-fedavg", None, role="train") == pytest.approx([0.85, 0.85])
    # a seed missing a site counts for no site mean
    assert real.seed_values(rows[1:], "central", ["acdc-test", "unseen-lge"]) == pytest.approx([0.71])

    settings = {"split": "group", "train_sites": "acdc-DCM, acdc-HCM", "seeds": "0, 1", "rounds": 10,
                "local_epochs": 2, "size": 128, "ft_epochs": 5, "cases": None, "config": "real.yaml",
                "overrides": "none", "command": "jras bench real --seeds 0,1"}
    summary = real.write_report(tmp_path, rows, cases, methods, ["LV", "MYO", "RV"], settings)
    text = (tmp_path / "report.md").read_text()
    assert summary in text and "Reproduce: `jras bench real --seeds 0,1`" in text
    # mean ± standard error over seeds; unseen mean per seed first
    assert ("| method | ACDC test | LGE | M&Ms B | M&Ms C | unseen mean | in-federation mean |") in summary
    assert "| fedavg+aug | 0.870 ± 0.010 | 0.600 ± 0.000 | 0.700 ± 0.000 | 0.500 ± 0.000 | 0.600 ± 0.000 | " \
           "0.850 ± 0.000 |" in summary
    assert "| jras-fedavg | 0.860 ± 0.010 | 0.680 ± 0.020 | 0.790 ± 0.010 | 0.510 ± 0.010 | 0.660 ± 0.007 | " \
           "0.850 ± 0.000 |" in summary
    assert "fedbn" not in summary  # not run: no row
    # the targets, computed
    assert "- ACDC test: the best federated method's Dice ≥ 0.88: **met** (fedavg+aug+adabn 0.900)" in summary
    assert ("- ACDC test: FedAvg within 0.01 of central training: **missed** (fedavg+aug+adabn 0.900, central 0.920: "
            "-0.020)") in summary
    # against the best private competitor; central training (which scores less here) is reported apart
    assert ("the best J-RAS method ≥ the best federated non-retrieval method + 0.03 (mean over LGE, M&Ms B, M&Ms C): "
            "**met** (jras-fedavg 0.660, fedavg+aug+adabn 0.620: +0.040)") in summary
    assert ("- Unseen sites, against central training (pooled data, not private; reported, not a target): "
            "jras-fedavg 0.660, central 0.500: +0.160") in summary
    assert ("- Unseen sites: jras-fedavg not below fedavg+aug+adabn on any unseen site: **missed** (LGE +0.060, "
            "M&Ms B +0.070, M&Ms C -0.010)") in summary
    assert "- M&Ms B: within 0.10 of the challenge entry's 0.87: **met** (jras-fedavg 0.790: -0.080)" in summary
    assert "- M&Ms C: within 0.10 of the challenge entry's 0.82: **missed** (jras-fedavg 0.510: -0.310)" in summary
    # per class per site, per volume where few cases are evaluated, diagnostics, time
    assert "## M&Ms B (`unseen-mnms-B`): Dice per class and HD95" in text and "Evaluated patients: 1." in text
    assert "| jras-fedavg | 0.790 ± 0.010 | 0.790 ± 0.010 | 0.790 ± 0.010 | 0.790 ± 0.010 | 5.000 ± 0.000 |" in text
    assert "## Per-volume Dice at sites with fewer than 5 evaluated patients" in text
    assert "| central | P1 ED | 0.750 ± 0.050 | – | 0.400 ± 0.000 | 0.750 ± 0.050 |" in text
    assert "| central | P1 ES | 0.550 ± 0.050 |" in text
    assert "| jras-fedavg | LGE | 0.680 ± 0.028 | 0.500 ± 0.000 | 0.900 ± 0.000 | 0.400 ± 0.000 | – | 0.56 | 1/2 |" in text
    assert "| jras-fedavg | M&Ms B | 0.790 ± 0.014 |" in text and "| 2/2 |" in text
    assert "| method | acdc-DCM | acdc-HCM | mean |" in text
    assert "| fedavg+aug | 0.800 ± 0.000 | 0.900 ± 0.000 | 0.850 ± 0.000 |" in text
    assert "| fedavg+aug | 101 | 2.00 | 700 | 20 |" in text  # wall s: mean of the seeds' runs (100, 102)

    # no result for a target's methods: said, not guessed
    only = [r for r in rows if r["method"] == "jras-fedavg"]
    lines = real.target_lines(only, methods)
    assert lines[1].endswith("not measured (needs central and fedavg+aug+adabn or fedavg+aug)")
    assert "not measured" in lines[2] and len(lines) == 5


# --------------------------------------------------------------------------- end to end


@needs_data
def test_limited_site_yamls_read_the_fixtures_by_absolute_path(tmp_path):
    train, held = real.site_yamls("random", 3, tmp_path)
    assert [p.stem for p in train] == list(real.SPLITS["random"]) and [p.stem for p in held] == list(real.HELDOUT_SITES)
    for path in [*train, *held]:
        assert path.parent.parent == tmp_path / "sites"
        cfg = SiteConfig.from_yaml(path)
        original = SiteConfig.from_yaml(real.SITES_DIR / path.name)
        assert Path(cfg.data.path).is_absolute() and Path(cfg.data.path).is_file()
        assert len(cfg.data.where["case"]) == (2 if "mnms" in path.stem else 3)
        assert cfg.support_cases == (None if original.support_cases is None else min(original.support_cases, 2))
        assert cfg.data.exclude == original.data.exclude and cfg.split_seed == original.split_seed
    # the project's own YAMLs otherwise: their relative paths resolve against their folder
    train, held = real.site_yamls("group", None, tmp_path)
    assert train[0] == real.SITES_DIR / "acdc-DCM.yaml" and held[-1] == real.SITES_DIR / "unseen-mnms-C.yaml"


@pytest.mark.slow
@needs_data
def test_quick_real_benchmark_end_to_end(tmp_path, capsys, flwr_home):
    out = tmp_path / "bench"
    # adapt.guides=auto: each held-out site decides on its support patients whether to use its guides
    argv = ["bench", "real", "--quick", "--methods", "jras-fedavg,jras-fedavg+ft", "--threads", "1", "--out",
            str(out), *[a for s in [*TINY, "adapt.guides=auto"] for a in ("--set", s)]]
    assert jras_main(argv) == 0
    printed = capsys.readouterr().out
    assert "expected runtime" in printed and "[2/2] jras-fedavg+ft" in printed and "## Targets" in printed

    rows = _rows(out / "results.csv")
    methods = ("jras-fedavg", "jras-fedavg+ft")
    held = {(r["method"], r["site"]): r for r in rows if r["role"] == "heldout"}
    assert set(held) == {(m, s) for m in methods for s in real.HELDOUT_SITES}
    for m in methods:
        assert sorted(r["site"] for r in rows if r["method"] == m and r["role"] == "train") == sorted(
            real.SPLITS["group"])
    for r in rows:
        assert 0.0 <= float(r["dice_mean"]) <= 1.0 and r["split"] == "group" and r["rounds"] == "1"
    for r in held.values():
        assert r["guide_dice"] != "" and r["dice_oracle"] != "" and r["evaluated_cases"] == "1"
        assert r["guides_used"] in ("0", "1") and r["support_dice_guided"] != ""
    # +ft is evaluated on the federation of jras-fedavg: one run folder, one training time
    run_dir = out / "runs" / "jras-fedavg" / "group-s0"
    assert not (out / "runs" / "jras-fedavg+ft").exists()
    assert len({r["wall_s"] for r in rows}) == 1 and float(rows[0]["wall_s"]) > 0
    from server.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run_dir)
    assert ckpt.round == 1 and ckpt.run_config["min-nodes"] == 5
    assert all(str(out / "sites") in s for s in ckpt.run_config["sites"].split(","))

    # one patient evaluated per site: per-volume Dice, consistent with the site's Dice per class (with or
    # without guides, as the site chose)
    cases = _rows(out / "cases.csv")
    for (m, site), r in held.items():
        vols = [c for c in cases if c["method"] == m and c["site"] == site]
        assert len(vols) == (1 if site == "unseen-lge" else 2)
        for cls in ("dice_lv", "dice_myo", "dice_rv"):
            values = [float(c[cls]) for c in vols if c[cls] != ""]
            if values and r[cls] != "":
                assert float(np.mean(values)) == pytest.approx(float(r[cls]), abs=1e-4)

    report = (out / "report.md").read_text()
    for heading in ("## Dice per site", "## Targets", "## ACDC test (`acdc-test`)", "## Per-volume Dice",
                    "## In-federation validation Dice", "## Retrieval diagnostics", "## Training and evaluation time"):
        assert heading in report
    assert "Reproduce: `jras bench real " in report
    for site in real.HELDOUT_SITES:
        data = (out / f"gallery-{site}.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000
        assert f"(gallery-{site}.png)" in report

    # a re-run with the same output folder skips what results.csv holds
    before = (out / "results.csv").read_bytes()
    assert jras_main(argv) == 0
    assert "2 of 2 runs already in" in capsys.readouterr().out
    assert (out / "results.csv").read_bytes() == before
    assert math.isfinite(float(rows[0]["bytes_per_round"]))
