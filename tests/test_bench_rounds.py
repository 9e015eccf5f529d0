"""``jras bench rounds`` and the local deployment it runs on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from shared_data import needs
from tiny_federation import TINY

from benchmarks.rounds import format_summary, round_rows, site_files, summarise
from tools.processes import is_alive


def _metrics(path: Path, walls: list[float], evaluate: bool = True) -> Path:
    lines = []
    for rnd, wall in enumerate(walls, start=1):
        sites = {f"node-{i}": {"train": {"client-cpu-s": 0.4, "num-examples": 10.0}} for i in range(2)}
        rec = {"round": rnd, "round_stats": {"wall_time_s": wall}, "sites": sites,
               "global": {"evaluate": {"dice_mean": 0.1 * rnd}} if evaluate else {}}
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_round_rows_and_summary(tmp_path):
    folded = round_rows(_metrics(tmp_path / "a.jsonl", [1.0, 1.0, 3.0]), "simulation", True, 0, cpus=2)
    separate = round_rows(_metrics(tmp_path / "b.jsonl", [2.0, 2.0, 2.0]), "simulation", False, 0, cpus=2)
    deployed = round_rows(_metrics(tmp_path / "c.jsonl", [20.0, 30.0, 40.0], evaluate=False), "deployment", True, 0)
    assert [r["round"] for r in folded] == [1, 2, 3] and folded[1]["dice_mean"] == pytest.approx(0.2)
    # 2 sites x 0.4 s on 2 cores: the ideal round is 0.4 s
    assert folded[0]["ideal_s"] == pytest.approx(0.4) and folded[0]["overhead"] == pytest.approx(0.6)
    assert math.isnan(deployed[0]["overhead"]) and math.isnan(deployed[0]["dice_mean"])
    assert {r["sites"] for r in folded + separate + deployed} == {2}  # as many as the records name
    summary = {(s["mode"], s["evaluation"]): s for s in summarise(folded + separate + deployed)}
    inner = summary[("simulation", "in the train exchange")]
    assert inner["round_median_s"] == 1.0  # the last round (its own evaluation phase) is left out
    assert inner["federation_s"] == [5.0] and inner["overhead_median"] == pytest.approx(0.6)
    assert inner["overhead_per_site_s"] == pytest.approx((1.0 - 0.4) / 2)
    assert summary[("deployment", "in the train exchange")]["overhead_range"] is None
    table = format_summary(list(summary.values()), 3)
    assert len(table) == 2 + 3 and "| deployment | in the train exchange | 2 | 25.00 s |" in table[-1]


def test_summary_keeps_each_number_of_sites_apart(tmp_path):
    four = round_rows(_metrics(tmp_path / "a.jsonl", [1.0, 1.0, 3.0]), "simulation", True, 0, cpus=2, sites=4)
    twenty = round_rows(_metrics(tmp_path / "b.jsonl", [3.0, 5.0, 9.0]), "simulation", True, 0, cpus=2, sites=20)
    summary = {s["sites"]: s for s in summarise(four + twenty)}
    assert sorted(summary) == [4, 20]
    assert summary[4]["round_median_s"] == 1.0 and summary[20]["round_median_s"] == 4.0
    # ideal 0.4 s a round (the records' two sites of 0.4 s on 2 cores): (wall - ideal) / sites
    assert summary[20]["overhead_per_site_s"] == pytest.approx(((3.0 - 0.4) / 20 + (5.0 - 0.4) / 20) / 2)


def test_bench_rounds_rejects_bad_arguments(tmp_path, capsys):
    from tools.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "rounds", "--modes", "simulation,cloud", "--out", str(tmp_path)])
    assert "subset of simulation, deployment" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "rounds", "--sites", "4,1", "--out", str(tmp_path)])
    assert "counts of at least 2" in capsys.readouterr().err
    assert main(["bench", "rounds", "--sites", "4,30", "--total-cases", "40", "--out", str(tmp_path)]) == 2
    assert "fewer than 2 cases to each of 30 sites" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "rounds", "--evaluation", "in-train,never", "--out", str(tmp_path)])
    assert "subset of in-train, separate" in capsys.readouterr().err
    assert main(["bench", "rounds", "--size", "100", "--out", str(tmp_path)]) == 2
    assert "multiple of 16" in capsys.readouterr().err


def test_site_files_take_the_size(tmp_path):
    import yaml

    sites = site_files(tmp_path / "sites", 3, cases=4, size=128)
    assert [yaml.safe_load(p.read_text())["vendor"] for p in sites] == ["A", "B", "C"]
    for p in sites:
        data = yaml.safe_load(p.read_text())
        assert data["data"]["size"] == 128 and data["data"]["cases"] == 4
        assert data["cache_dir"] == str(tmp_path / "sites" / f"cache-{data['vendor']}")
        assert data["key_file"] == str(tmp_path / "sites" / "keys" / f"{data['vendor']}.key")  # an encrypted store


@needs("acdc")
def test_acdc_site_files_hold_the_patients_in_turn(tmp_path):
    import yaml

    sites = [yaml.safe_load(p.read_text()) for p in site_files(tmp_path / "sites", 2, cases=3, data="acdc")]
    assert [s["name"] for s in sites] == ["acdc-1", "acdc-2"]
    assert [s["data"]["where"]["case"] for s in sites] == [
        ["patient001", "patient002", "patient003"], ["patient004", "patient005", "patient006"]]
    assert all(Path(s["key_file"]).is_file() and s["cache_dir"] for s in sites)


def test_site_files_beyond_four_sites_are_other_cases_of_the_vendors(tmp_path):
    import yaml

    from jras_core.config import JRASConfig
    from jras_core.site import Site

    paths = site_files(tmp_path / "sites", 10, cases=2, size=32)
    data = [yaml.safe_load(p.read_text()) for p in paths]
    assert [d["vendor"] for d in data] == list("ABCDABCDAB")
    names = [d["name"] for d in data]
    assert len(set(names)) == 10 and names[4] == "synthetic-A2" and names[9] == "synthetic-B3"
    assert len({d["cache_dir"] for d in data}) == 10
    assert data[8]["data"]["seed"] == data[0]["data"]["seed"] + 20
    method = JRASConfig().with_overrides({"preprocess.size": 32})
    first, again = Site.from_yaml(paths[0], method), Site.from_yaml(paths[4], method)
    assert first.slices.images.shape[1:] == (1, 32, 32)
    assert not torch.equal(first.slices.images[:4], again.slices.images[:4])  # the same vendor, other cases


@pytest.mark.slow
def test_local_deployment_evaluates_in_the_train_exchange(tmp_path):
    """A real SuperLink and two SuperNodes on this machine, two rounds: round 1's model is
    evaluated in round 2's train messages (through the SuperLink, as metrics of the train
    reply), round 2's in the evaluation phase; every process is stopped on close."""
    from tools.localhost import LocalDeployment

    sites = site_files(tmp_path / "sites", 2, cases=4)
    rc = {"num-server-rounds": 2, "local-epochs": 1, "image-size": 32, "method-overrides": TINY,
          "method-config": "configs/demo.yaml", "round-timeout": 300}
    with LocalDeployment(sites, work_dir=tmp_path / "deploy") as deployment:
        pids = [p.pid for p in deployment._procs]
        assert len(pids) == 3 and all(is_alive(p) for p in pids)
        run_dir = deployment.run(Path(__file__).resolve().parents[1], rc, tmp_path / "runs" / "folded", timeout=600)
    assert not any(is_alive(p) for p in pids)
    lines = [json.loads(x) for x in (run_dir / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    for r in lines:
        assert len(r["sites"]) == 2 and r["errors"] == {}
        assert all("dice_mean" in s["evaluate"] and "seg_loss" in s["train"] for s in r["sites"].values())
    assert "timeouts_evaluate" not in lines[0]["round_stats"]  # no evaluation phase in round 1
    assert lines[1]["round_stats"]["timeouts_evaluate"] == 0
    assert (tmp_path / "sites" / "cache-A").is_dir()  # the sites' slice caches
    with pytest.raises(FileNotFoundError, match="site YAML not found"):
        LocalDeployment([tmp_path / "missing.yaml"])
