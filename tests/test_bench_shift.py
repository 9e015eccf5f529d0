"""The vendor-shift benchmark: ``jras bench shift --quick`` end to end (two real
Simulation Engine federations), the in-process methods (local-only, centralised,
fine-tuning, AdaBN under FedBN), the report's arithmetic and bad arguments."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import shift
from benchmarks.report import (
    heldout_by_seed_mean,
    mean_se,
    mean_std,
    paired_differences,
    write_report,
)
from jras_core.config import ConfigError
from tools.cli import main as jras_main
from tools.processes import pids_with_args

PROJECT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = {"segmenter.channels": [4, 8, 16], "retriever.channels": [4, 8], "retriever.embed_dim": 8,
        "train.batch_size": 32, "contrastive.steps_per_epoch": 1}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_quick_benchmark_end_to_end(tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench"
    assert jras_main(["bench", "shift", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "expected runtime" in printed and "[2/2]" in printed

    rows = _rows(out / "results.csv")
    required = {"method", "heldout", "site", "seed", "dice_mean", "dice_lv", "dice_myo", "dice_rv", "hd95_mean",
                "guide_dice", "dice_oracle", "dice_random", "rounds", "wall_s", "bytes_per_round", "peak_rss_mb"}
    assert required <= set(rows[0])
    for method in ("fedavg+aug", "jras-fedavg"):
        mine = [r for r in rows if r["method"] == method]
        held = [r for r in mine if r["role"] == "heldout"]
        assert [(r["heldout"], r["site"], r["seed"]) for r in held] == [("D", "heldout-D", "0")]
        assert sorted(r["site"] for r in mine if r["role"] == "train") == ["site-A", "site-B", "site-C"]
        for r in mine:
            assert 0.0 <= float(r["dice_mean"]) <= 1.0
            assert r["rounds"] == "2" and float(r["wall_s"]) > 0
            assert float(r["bytes_per_round"]) > 1e5 and float(r["peak_rss_mb"]) > 100
        diag = [r["guide_dice"] for r in held] + [r["dice_oracle"] for r in held] + [r["dice_random"] for r in held]
        assert all(d != "" for d in diag) if method == "jras-fedavg" else all(d == "" for d in diag)

        run_dir = out / "runs" / method / "heldout-D-s0"
        assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
        records = [json.loads(x) for x in (run_dir / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in records] == [1, 2]
        for r in records:
            assert r["round_stats"]["num_sites_train"] == 3 and r["round_stats"]["num_sites_evaluate"] == 3
            assert "partition-id" not in r["global"]["evaluate"]  # per-site only, never averaged
        # the in-federation rows are the last round's per-site validation of the run
        last = {site["evaluate"]["partition-id"]: site["evaluate"]["dice_mean"] for site in records[-1]["sites"].values()}
        by_site = {r["site"]: float(r["dice_mean"]) for r in mine if r["role"] == "train"}
        assert by_site["site-A"] == pytest.approx(last[0], abs=1e-5)

    from server.checkpoint import load_checkpoint
    from tools.simulate import format_site_table, site_table

    ckpt = load_checkpoint(out / "runs" / "jras-fedavg" / "heldout-D-s0")
    assert ckpt.round == 2 and ckpt.run_config["min-nodes"] == 3 and ckpt.run_config["strategy"] == "fedavg"
    table = format_site_table(site_table(out / "runs" / "jras-fedavg" / "heldout-D-s0"))
    assert "site-B" in table and "guide_dice" in table
    assert not pids_with_args("flower-superlink", str(out))  # every local SuperLink was stopped

    report = (out / "report.md").read_text()
    assert "## Held-out vendor Dice" in report and "## In-federation validation Dice" in report
    assert "| jras-fedavg |" in report and "| fedavg+aug |" in report and "## Retrieval diagnostics" in report
    for png in ("heldout_dice.png", "gallery-D.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000

    # a re-run with the same output folder skips what results.csv holds: no new federation
    before = (out / "results.csv").read_bytes()
    assert jras_main(["bench", "shift", "--quick", "--out", str(out)]) == 0
    assert "2 of 2 runs already in" in capsys.readouterr().out
    assert (out / "results.csv").read_bytes() == before

    # --reevaluate with more held-out cases: the finished federations are evaluated again, not retrained;
    # the training sites are evaluated anew as well, not read from the runs' records
    import tools.simulate

    monkeypatch.setattr(tools.simulate, "site_table", lambda *a, **k: pytest.fail("in-federation rows read back"))
    ckpt_path = out / "runs" / "jras-fedavg" / "heldout-D-s0" / "checkpoint.pt"
    stamp = ckpt_path.stat().st_mtime_ns
    assert jras_main(["bench", "shift", "--quick", "--out", str(out), "--reevaluate", "--heldout-cases", "9"]) == 0
    printed = capsys.readouterr().out
    assert "2 finished federations" in printed and "expected runtime" not in printed
    assert "held-out vendors: 9 cases" in printed
    assert ckpt_path.stat().st_mtime_ns == stamp
    again = _rows(out / "results.csv")
    old_held = {r["method"]: r for r in rows if r["role"] == "heldout"}
    new_held = {r["method"]: r for r in again if r["role"] == "heldout"}
    assert set(new_held) == set(old_held) and len(again) == len(rows)
    for method, r in new_held.items():
        assert r["wall_s"] == old_held[method]["wall_s"]  # the training's wall time is kept
    assert any(r["dice_mean"] != old_held[m]["dice_mean"] for m, r in new_held.items())  # other cases evaluated
    # the same final models on the same validation cases: the in-federation Dice measured again agrees
    old_train = {(r["method"], r["site"]): float(r["dice_mean"]) for r in rows if r["role"] == "train"}
    new_train = {(r["method"], r["site"]): float(r["dice_mean"]) for r in again if r["role"] == "train"}
    assert set(new_train) == set(old_train)
    assert all(new_train[k] == pytest.approx(v, abs=0.02) for k, v in old_train.items())
    assert "annotated cases of 9" in (out / "report.md").read_text()

    # inference-option variants are evaluated on their base method's finished federation, not trained
    # (the first finds it in the base's folder, the second takes it from the first)
    variants = ["jras-fedavg[retrieval.test_passes=1]", "jras-fedavg[retrieval.test_passes=3]"]
    assert jras_main(["bench", "shift", "--quick", "--out", str(out), "--heldout-cases", "9",
                      "--methods", ",".join(variants)]) == 0
    printed = capsys.readouterr().out
    assert "2 finished federations" in printed and "expected runtime" not in printed
    assert ckpt_path.stat().st_mtime_ns == stamp and not (out / "runs" / "jras-fedavg_retrieval.test_passes=1_").exists()
    for name in variants:
        variant = [r for r in _rows(out / "results.csv") if r["method"] == name]
        assert len(variant) == 4 and all(0.0 <= float(r["dice_mean"]) <= 1.0 for r in variant)


def _settings(tmp_path: Path, **over) -> shift.Settings:
    kw = {"method_config": PROJECT / "configs" / "demo.yaml", "config_overrides": TINY,
              "rounds": 1, "local_epochs": 1, "size": 32, "support": 1, "ft_epochs": 1, "out": tmp_path}
    kw.update(over)
    return shift.Settings(**kw)


@pytest.mark.slow
def test_local_central_finetune_in_process(tmp_path):
    from jras_core.models.jras import build_model
    from jras_core.site import Site
    from jras_core.training.adapt import adapt_to_site

    torch.set_num_threads(2)
    st = _settings(tmp_path)
    vds = shift.vendor_sites("synthetic", cases=4, size=32, data_seed=3)
    assert [v.vendor for v in vds] == ["A", "B", "C", "D"]
    keys = ["dice_lv", "dice_myo", "dice_rv"]

    local = shift.METHODS["local"]
    cfg = st.method_cfg(local, seed=0)
    sites = [Site(shift.site_config(v, f"site-{v.vendor}"), cfg) for v in vds[:2]]
    trained = shift.train_local(sites, st, tmp_path / "local", keys)
    assert len(trained.states) == 2 and [r["site"] for r in trained.train_rows] == ["site-A", "site-B"]
    assert list((tmp_path / "local" / "tensorboard").rglob("events.out.tfevents.*"))
    held = shift.heldout_site(vds[3], cfg, st.support)
    metrics, _ = shift.evaluate_heldout(local, trained, held, st, keys)
    per_model = []
    for state in trained.states:
        model = build_model(held.method)
        shift.load_state(model, state)
        # as the held-out site evaluates: with its own normalisation statistics (adapt.norm_stats)
        per_model.append(held.evaluate(adapt_to_site(model, held.train_set, held.method))["dice_mean"])
    assert metrics["dice_mean"] == pytest.approx(float(np.mean(per_model)), abs=1e-6)  # mean of the local models

    central = shift.METHODS["central"]
    sites = [Site(shift.site_config(v, f"site-{v.vendor}"), st.method_cfg(central, 0)) for v in vds[:2]]
    trained = shift.train_central(sites, st, tmp_path / "central", keys)
    assert len(trained.states) == 1 and len(trained.train_rows) == 2

    # +ft adapts to the support cases: one patient is too few to fine-tune with (adapt.min_cases),
    # so AdaBN only; with two of them one picks the epoch for the other, never for the worse
    ft = shift.METHODS["jras-fedavg+ft"]
    held = shift.heldout_site(vds[3], st.method_cfg(ft, 0), st.support)
    base = build_model(held.method)
    pseudo = shift.Trained([{k: v.clone() for k, v in base.state_dict().items()}], [], 1.0)
    metrics, tuned = shift.evaluate_heldout(ft, pseudo, held, st, keys)
    assert {"dice_mean", "guide_dice", "dice_oracle", "dice_random", *shift.FINETUNE} <= set(metrics)
    assert metrics["ft_epochs_run"] == 0 and metrics["ft_best_epoch"] == 0
    changed = [k for k, v in tuned.state_dict().items() if v.is_floating_point() and not torch.equal(v, base.state_dict()[k])]
    assert changed and all("running" in k for k in changed)  # statistics only
    held = shift.heldout_site(vds[3], st.method_cfg(ft, 0), 2)
    metrics, tuned = shift.evaluate_heldout(ft, pseudo, held, dataclasses.replace(st, support=2), keys)
    assert metrics["ft_epochs_run"] == 1 and metrics["ft_best_epoch"] in (0, 1)  # --ft-epochs 1
    assert metrics["ft_val_dice_best"] >= metrics["ft_val_dice_start"]


def test_adabn_recalibrates_statistics_only(tmp_path):
    from jras_core.models.jras import build_model
    from jras_core.site import Site
    from jras_core.training.adapt import recalibrate_norm

    st = _settings(tmp_path)
    cfg = st.method_cfg(shift.METHODS["jras-fedbn"], 0)
    vd = shift.vendor_sites("synthetic", cases=3, size=32, data_seed=3)[3]
    site = Site(shift.site_config(vd, "held", support=1), cfg)
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n = recalibrate_norm(model, site.train_set, cfg, site.bank)
    assert n > 0
    after = model.state_dict()
    stats = [k for k in after if k.endswith("running_mean")]
    assert stats and all(not torch.equal(after[k], before[k]) for k in stats)
    params = {k for k, _ in model.named_parameters()}
    assert all(torch.equal(after[k], before[k]) for k in params)  # no weight is trained
    first = next(m for m in model.seg.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert torch.isfinite(first.running_mean).all() and first.momentum == 0.1


@pytest.mark.slow
def test_adapt_norm_stats_evaluates_a_held_out_site_with_its_own_statistics(tmp_path):
    """``adapt.norm_stats``: a held-out site evaluates a recalibrated copy of the model (the
    given model is untouched); training sites and the default keep the federation's statistics."""
    from jras_core.models.jras import build_model
    from jras_core.site import Site
    from jras_core.training.adapt import adapt_to_site
    from jras_core.training.centralised import evaluate_sites

    st = _settings(tmp_path)
    cfg = st.method_cfg(shift.METHODS["jras-fedavg"], 0)
    assert cfg.adapt.norm_stats  # the default
    assert not st.method_cfg(shift.parse_methods("jras-fedavg[adapt.norm_stats=false]")[0], 0).adapt.norm_stats
    vd = shift.vendor_sites("synthetic", cases=3, size=32, data_seed=3)[3]
    held = Site(shift.site_config(vd, "held", support=1), cfg)
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = adapt_to_site(model, held.train_set, cfg, held.bank)
    assert adapted is not model and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    means = [k for k in before if k.endswith("running_mean")]
    assert all(not torch.equal(adapted.state_dict()[k], before[k]) for k in means)
    off = cfg.with_overrides({"adapt.norm_stats": False})
    assert adapt_to_site(model, held.train_set, off, held.bank) is model
    # evaluate_sites: the held-out site's result is the adapted model's, the other the plain one's
    trained = Site(shift.site_config(shift.vendor_sites("synthetic", cases=3, size=32, data_seed=3)[0], "train"), cfg)
    with_adapt = evaluate_sites(model, [held, trained], cfg, diagnostics=False)
    without = evaluate_sites(model, [held, trained], off, diagnostics=False)
    assert with_adapt["train"]["dice_mean"] == pytest.approx(without["train"]["dice_mean"])
    assert with_adapt["held"]["dice_mean"] != pytest.approx(without["held"]["dice_mean"], abs=1e-9)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # an adapt-only variant shares its base's training and does not re-evaluate the training sites
    variant = shift.parse_methods("jras-fedavg[adapt.norm_stats=false]")[0]
    assert variant.trains_as == "jras-fedavg" and variant.training_key == shift.METHODS["jras-fedavg"].training_key
    assert not shift._changes_training_sites(shift.METHODS["jras-fedavg"].overrides, variant.overrides)
    assert shift._changes_training_sites(variant.overrides, {**variant.overrides, "retrieval.test_passes": 1})


def test_report_arithmetic(tmp_path):
    rows = []
    for seed, (a, b) in enumerate([(0.5, 0.7), (0.7, 0.9)]):
        for h, d in (("A", a), ("B", b)):
            rows.append({"method": "m", "heldout": h, "site": f"heldout-{h}", "role": "heldout", "seed": str(seed),
                         "dice_mean": str(d), "guide_dice": "0.5", "dice_oracle": "0.9", "dice_random": "0.4",
                         "wall_s": "10", "bytes_per_round": "2000000", "peak_rss_mb": "700"})
        rows.append({"method": "m", "heldout": "A", "site": "site-B", "role": "train", "seed": str(seed),
                     "dice_mean": "0.8"})
    assert heldout_by_seed_mean(rows, "m", ["A", "B"]) == pytest.approx([0.6, 0.8])
    assert mean_std([0.5, 0.7]) == "0.600 ± 0.141"
    assert mean_se([0.6, 0.8]) == "0.700 ± 0.100" and mean_se([0.6]) == "0.600" and mean_std([]) == "–"
    text = write_report(tmp_path, rows, ["m"], ["LV"], settings={
        "dataset": "x", "vendors": "A, B", "heldout": "A, B", "seeds": "0, 1", "rounds": 1, "local_epochs": 1,
        "size": 32, "support": 1, "config": "c", "overrides": "none", "command": "jras bench shift"}, descriptions={})
    assert "| m | 0.600 ± 0.141 | 0.800 ± 0.141 | 0.700 ± 0.100 |" in text
    # gap closed: (0.7 - 0.4) / (0.9 - 0.4)
    assert "| 0.60 |" in text
    assert "Paired difference" not in text  # no baseline among the methods

    # the baseline, 0.1 below on A and 0.1 above on B for seed 0, level on both for seed 1
    for seed, (a, b) in enumerate([(0.4, 0.8), (0.7, 0.9)]):
        for h, d in (("A", a), ("B", b)):
            rows.append({"method": "fedavg+aug", "heldout": h, "site": f"heldout-{h}", "role": "heldout",
                         "seed": str(seed), "dice_mean": str(d)})
    diffs = paired_differences(rows, "m", "fedavg+aug", ["A", "B"])
    assert diffs["A"] == pytest.approx([0.1, 0.0]) and diffs["B"] == pytest.approx([-0.1, 0.0])
    assert diffs["mean"] == pytest.approx([0.0, 0.0])
    text = write_report(tmp_path, rows, ["fedavg+aug", "m"], ["LV"], settings={
        "dataset": "x", "vendors": "A, B", "heldout": "A, B", "seeds": "0, 1", "rounds": 1, "local_epochs": 1,
        "size": 32, "support": 1, "config": "c", "overrides": "none", "command": "jras bench shift"}, descriptions={})
    assert "| m | +0.050 ± 0.050 (1/2) | -0.050 ± 0.050 (0/2) | +0.000 ± 0.000 (0/2) |" in text
    assert (tmp_path / "heldout_dice.png").read_bytes().startswith(PNG_MAGIC)


def test_bad_arguments_name_the_problem(tmp_path, capsys):
    assert jras_main(["bench", "shift", "--methods", "fedavg,magic", "--out", str(tmp_path)]) == 2
    assert "unknown 'magic'" in capsys.readouterr().err
    assert jras_main(["bench", "shift", "--quick", "--heldout", "Z", "--out", str(tmp_path)]) == 2
    assert "--heldout Z: not a vendor" in capsys.readouterr().err
    assert jras_main(["bench", "shift", "--quick", "--heldout-cases", "2", "--out", str(tmp_path)]) == 2
    assert "--heldout-cases (2) must exceed --support (2)" in capsys.readouterr().err
    assert shift.reproduce_command(["--report-only", "--methods", "jras-fedavg[retrieval.k=5; train.lr=0.01]"]) == (
        "jras bench shift --methods 'jras-fedavg[retrieval.k=5; train.lr=0.01]'")
    with pytest.raises(ConfigError, match="brackets"):
        shift.parse_methods("jras-fedavg[retrieval.k=5")
    with pytest.raises(ConfigError, match="twice"):
        shift.parse_methods("fedavg,fedavg")
    lever = shift.parse_methods("fedavg+aug,jras-fedavg[retriever.pool_grid=4; segmenter.channels=[8, 16]]")[1]
    assert lever.name == "jras-fedavg[retriever.pool_grid=4; segmenter.channels=[8, 16]]"
    assert lever.overrides == {"augment.intensity": True, "retriever.pool_grid": 4, "segmenter.channels": [8, 16]}
    assert lever.training_key != shift.METHODS["jras-fedavg"].training_key and lever.uses_retrieval
    # a variant of inference options only shares its base method's training and folder
    base = shift.METHODS["jras-fedavg"]
    one_round, clean, trained = shift.parse_methods(
        "jras-fedavg[retrieval.test_passes=1],jras-fedavg[postprocess.largest_component=false; retrieval.test_draws=2],"
        "jras-fedavg[retrieval.test_passes=1; retrieval.k=5]")
    assert one_round.trains_as == clean.trains_as == "jras-fedavg" and trained.trains_as is None
    assert one_round.training_key == clean.training_key == base.training_key != trained.training_key
    st0 = _settings(tmp_path)
    assert st0.run_dir(one_round, "D", 1) == st0.run_dir(base, "D", 1) != st0.run_dir(trained, "D", 1)
    local_variant = shift.parse_methods("local[retrieval.test_passes=1]")[0]
    assert local_variant.trains_as is None and local_variant.training_key != shift.METHODS["local"].training_key
    # --init: a path per run, federated methods only, every checkpoint present before anything runs
    st = _settings(tmp_path, init=str(tmp_path / "pre" / "{method}" / "heldout-{heldout}-s{seed}.pt"))
    assert st.init_path(lever, "D", 2) == tmp_path / "pre" / "jras-fedavg_retriever.pool_grid=4_segmenter.channels=_8_16_" / "heldout-D-s2.pt"
    based = _settings(tmp_path, init=str(tmp_path / "pre" / "{base}.pt"))
    assert based.init_path(lever, "D", 2) == tmp_path / "pre" / "jras-fedavg.pt"
    with pytest.raises(ConfigError, match=r"only \{method\}, \{base\}, \{heldout\} and \{seed\}"):
        _settings(tmp_path, init="x-{site}.pt").init_path(lever, "D", 0)
    assert jras_main(["bench", "shift", "--quick", "--methods", "local,fedavg", "--init", "x.pt", "--out", str(tmp_path)]) == 2
    assert "--init applies to federated methods only, not local" in capsys.readouterr().err
    pattern = str(tmp_path / "pre" / "{method}.pt")
    (tmp_path / "pre").mkdir()
    (tmp_path / "pre" / "fedavg+aug.pt").write_bytes(b"")
    assert jras_main(["bench", "shift", "--quick", "--init", pattern, "--out", str(tmp_path)]) == 2
    assert f"--init: checkpoint {tmp_path / 'pre' / 'jras-fedavg.pt'} not found" in capsys.readouterr().err
    assert not (tmp_path / "results.csv").exists()
    manifest = tmp_path / "m.csv"
    manifest.write_text("case,phase,image,mask\nc1,ED,a.nii.gz,b.nii.gz\n")
    with pytest.raises(ConfigError, match="vendor"):
        shift.vendor_sites(str(manifest), 4, 32, 0)
    with pytest.raises(ConfigError, match="not found"):
        shift.vendor_sites(str(tmp_path / "missing.csv"), 4, 32, 0)


@pytest.mark.skipif(not shift.MNMS_SAMPLE.is_file(), reason="M&Ms sample fixture not beside the project")
def test_mnms_sample_vendors():
    vds = shift.vendor_sites("mnms-sample", 0, 64, 0)
    assert [v.vendor for v in vds] == ["A", "B", "C"]
    assert all(v.source.kind == "manifest" and v.val_fraction == 0.5 for v in vds)


def test_runtime_estimate_follows_the_calibration_and_the_worker_pool(tmp_path: Path):
    calib = {"plain": 0.01, "retrieval": 0.02, "train_slices": 90, "val_slices": 0}  # training time only
    job = shift.Job(shift.METHODS["jras-fedavg"], "D", 0)
    st = _settings(tmp_path)
    base = shift.estimate_job_s(job, calib, st, 3, 2)
    # twice the per-slice cost: about twice the time beyond the fixed Flower start
    slower = shift.estimate_job_s(job, {**calib, "retrieval": 0.04}, st, 3, 2)
    assert slower - shift.FLOWER_START_S == pytest.approx(2 * (base - shift.FLOWER_START_S))
    # 3 sites on 2 cores: Ray's 2 workers take two waves, sharing the cores takes one
    shared = shift.estimate_job_s(job, calib, _settings(tmp_path, share_cores=True), 3, 2)
    assert shared - shift.FLOWER_START_S == pytest.approx((base - shift.FLOWER_START_S) * 1.5 / 2)


def test_methods_carry_server_settings_in_brackets():
    """Keys without a dot in a method's brackets are the server's run-config entries: they
    pick the strategy, give the federation its own training run and reach the run config;
    an unknown one, or one on a method without a server, is refused."""
    from jras_core.config import ConfigError

    plain, momentum = shift.parse_methods("fedavg+aug,fedavg+aug[strategy=fedavgm;server-momentum=0.5;train.lr=0.002]")
    assert momentum.strategy == "fedavgm" and momentum.server == {"strategy": "fedavgm", "server-momentum": 0.5}
    assert momentum.overrides["train.lr"] == 0.002 and "server-momentum" not in momentum.overrides
    assert momentum.training_key != plain.training_key and momentum.trains_as is None
    with pytest.raises(ConfigError, match="unknown server setting 'server-mom'"):
        shift.parse_methods("fedavg+aug[server-mom=0.5]")
    with pytest.raises(ConfigError, match="central has no server"):
        shift.parse_methods("central[server-momentum=0.5]")
