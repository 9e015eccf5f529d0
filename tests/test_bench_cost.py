"""`jras bench cost --quick`: every section measured, files written, FAISS == brute force."""

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from benchmarks.cost import (
    SECTION_TITLES,
    check_same_topk,
    flower_overhead,
    flower_startup,
    main,
    resolve_options,
    search_times,
)
from tools.cli import build_parser


def test_cli_wires_bench_cost():
    args = build_parser().parse_args(["bench", "cost", "--quick", "--out", "x", "--sizes", "32,48"])
    assert args.quick and args.out == "x" and args.sizes == [32, 48]
    assert args.func.__name__ == "cmd_bench_cost"
    assert resolve_options(args).sections == frozenset(SECTION_TITLES)
    args = build_parser().parse_args(["bench", "cost", "--only", "step,transfer"])
    assert resolve_options(args).sections == {"step", "transfer"}
    with pytest.raises(ValueError, match="gpu"):
        resolve_options(build_parser().parse_args(["bench", "cost", "--only", "step,gpu"]))


def _metrics_jsonl(path: Path) -> Path:
    """A two-round, two-site simulation record in the layout of ``tensorboard/metrics.jsonl``."""
    rounds = []
    for rnd, wall in ((1, 10.0), (2, 8.0)):
        sites = {f"node-{i}": {"train": {"client-time-s": 3.0 + i}, "evaluate": {"client-time-s": 0.5}} for i in range(2)}
        rounds.append({"round": rnd, "round_stats": {"wall_time_s": wall}, "global": {}, "sites": sites})
    path.write_text("\n".join(json.dumps(r) for r in rounds) + "\n")
    return path


def test_flower_overhead_from_metrics(tmp_path: Path):
    rounds = flower_overhead(_metrics_jsonl(tmp_path / "metrics.jsonl"), cpus=2)
    assert [r["round"] for r in rounds] == [1, 2]
    # sites run in parallel: the round waits for the slowest site of each phase (4.0 + 0.5 s)
    assert rounds[0]["compute_s"] == pytest.approx(8.0) and rounds[0]["critical_s"] == pytest.approx(4.5)
    assert rounds[0]["overhead"] == pytest.approx(1 - 4.5 / 10.0)
    assert rounds[1]["overhead"] == pytest.approx(1 - 4.5 / 8.0)
    # on one core the round cannot be shorter than all the compute in a row
    assert flower_overhead(tmp_path / "metrics.jsonl", cpus=1)[0]["overhead"] == pytest.approx(1 - 8.0 / 10.0)
    (tmp_path / "empty.jsonl").write_text(json.dumps({"round": 1, "round_stats": {"wall_time_s": 1.0}}))
    with pytest.raises(ValueError):
        flower_overhead(tmp_path / "empty.jsonl")


def test_flower_overhead_prefers_cpu_time(tmp_path: Path):
    """Sites that share cores wait for the CPU: their wall time is not their compute."""
    sites = {f"node-{i}": {"train": {"client-time-s": 6.0, "client-cpu-s": 4.0}} for i in range(3)}
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"round": 1, "round_stats": {"wall_time_s": 7.5, "server_time_s": 0.25},
                                "sites": sites}) + "\n")
    (r,) = flower_overhead(path, cpus=2)
    assert r["measure"] == "cpu" and r["compute_s"] == pytest.approx(12.0) and r["server_s"] == 0.25
    # three sites of 4 s on two cores: 6 s at best
    assert r["ideal_s"] == pytest.approx(6.0) and r["overhead"] == pytest.approx(1 - 6.0 / 7.5)
    # phases are barriers: each phase's slowest site counts on its own
    sites = {"node-0": {"train": {"client-cpu-s": 4.0}, "evaluate": {"client-cpu-s": 0.5}},
             "node-1": {"train": {"client-cpu-s": 1.0}, "evaluate": {"client-cpu-s": 3.0}}}
    path.write_text(json.dumps({"round": 1, "round_stats": {"wall_time_s": 8.0}, "sites": sites}) + "\n")
    (r,) = flower_overhead(path, cpus=2)
    assert r["ideal_s"] == pytest.approx(7.0) and r["critical_s"] == pytest.approx(7.0)


def test_flower_startup_beside_the_metrics(tmp_path: Path):
    metrics = _metrics_jsonl(tmp_path / "metrics.jsonl")
    assert flower_startup(metrics) is None
    startup = {"wall_time_s": 12.5, "sites": 2, "sites_ready": 2, "client-time-s": {"node-0": 4.0, "node-1": 3.0}}
    (tmp_path / "startup.json").write_text(json.dumps(startup))
    assert flower_startup(metrics) == startup


@pytest.mark.slow
def test_quick_run_writes_every_section(tmp_path: Path, capsys):
    metrics = _metrics_jsonl(tmp_path / "metrics.jsonl")
    (tmp_path / "startup.json").write_text(json.dumps({"wall_time_s": 9.0, "sites": 2, "sites_ready": 2,
                                                       "client-time-s": {"node-0": 4.0, "node-1": 3.5}}))
    assert main(["--quick", "--out", str(tmp_path), "--flower-metrics", str(metrics)]) == 0
    assert (tmp_path / "cost.md").is_file() and (tmp_path / "cost.csv").is_file()
    with open(tmp_path / "cost.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert set(rows[0]) == {"section", "item", "value", "unit", "note"}
    for section in set(SECTION_TITLES) - {"sites"}:  # sites: only with --site-sizes
        values = [float(r["value"]) for r in rows if r["section"] == section]
        assert values, f"no rows for section {section}"
        assert all(math.isfinite(v) and v > 0 for v in values), section
    agree = [r for r in rows if r["section"] == "search" and r["item"].startswith("FAISS == brute force")]
    assert {r["item"].rsplit("=", 1)[1] for r in agree} == {"1000", "10000"}
    assert all(float(r["value"]) == 1.0 for r in agree)
    augment = {r["item"].split(",")[1].strip(): float(r["value"]) for r in rows
               if r["item"].startswith("intensity augmentation")}
    assert set(augment) == {"16 images", "16 stacks of 1 + 3"}
    inference = {r["item"].rsplit(",", 1)[0] for r in rows if r["item"].startswith("inference")}
    assert inference == {"inference none", "inference J-RAS, 1 retrieval round", "inference J-RAS, 2 retrieval round(s)",
                         "inference J-RAS (2 round(s)) / none"}
    md = (tmp_path / "cost.md").read_text()
    assert "Flower round overhead" in md and "round 2 overhead" in md and "warm-up before round 1" in md
    out = capsys.readouterr().out
    assert "Training step time" in out
    assert f"OPENBLAS_CORETYPE {os.environ.get('OPENBLAS_CORETYPE', 'unset')}" in out  # the kernels FAISS ran


def test_faiss_and_brute_force_agree_and_a_mismatch_is_caught():
    assert search_times(1000, 128, 18, 256, repeats=1)["agree"] == 1.0
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 8)).astype(np.float32)
    q = rng.standard_normal((2, 8)).astype(np.float32)
    s = q @ x.T
    idx = np.argsort(-s, axis=1)[:, :3]
    sims = np.take_along_axis(s, idx, 1)
    assert check_same_topk(sims, idx, sims, idx, x, q) == 1.0
    wrong = idx.copy()
    wrong[0, 2] = np.argsort(s[0])[0]  # the worst entry instead of the third best
    with pytest.raises(AssertionError):
        check_same_topk(sims, idx, sims, wrong, x, q)


def test_hnsw_against_flat_on_clustered_embeddings():
    from benchmarks.cost import clustered_embeddings, index_times, recall_at

    x = clustered_embeddings(500, 16, seed=0, clusters=10)
    assert x.shape == (500, 16) and np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    r = index_times(3000, 32, nq=64, k=10, repeats=1)
    assert r["recall3"] >= 0.95 and r["recall10"] >= 0.95
    assert r["hnsw_bytes"] > r["flat_bytes"] >= r["data_bytes"]  # the graph comes on top of the vectors
    assert recall_at(np.array([[1, 2, 3]]), np.array([[3, 2, 9]]), 3) == pytest.approx(2 / 3)


def test_acdc_derived_sites_and_section_choice(tmp_path: Path):
    from benchmarks.cost import _sections, acdc_site_rows

    manifest = tmp_path / "manifest.csv"
    manifest.write_text("case,phase,vendor,image,mask\n" + "".join(
        f"p{i},ED,A,p{i}.nii.gz,p{i}_gt.nii.gz\n" for i in range(3)))
    rows = acdc_site_rows(manifest, 46)  # about 9.2 slices a volume: 5 rows, the first two again
    assert [r["case"] for r in rows] == ["p0", "p1", "p2", "p0#1", "p1#1"]
    assert rows[3]["image"] == str((tmp_path / "p0.nii.gz").resolve())
    assert _sections("index,sites") == {"index", "sites"} and _sections(None) == set(SECTION_TITLES)
    with pytest.raises(ValueError, match="unknown section"):
        _sections("index,nope")
