"""The Simulation Engine launcher: a failing run is reported and its local SuperLink
stopped; per-site tables from a run's metrics. (A successful real Simulation Engine
run, 3 sites x 2 rounds, is the end-to-end test of ``jras bench shift --quick`` in
``test_bench_shift.py``, through the same :func:`tools.simulate.run_simulation`.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_federation import TINY, write_sites

from tools.processes import child_pids, listening_sockets, pids_with_args, stop_pid
from tools.simulate import (
    OFFLINE_ENV,
    SimulationError,
    format_site_table,
    phase_units,
    ray_cpus,
    run_simulation,
    site_table,
)

PROJECT = Path(__file__).resolve().parents[1]


def test_ray_cpus_add_workers_only_where_they_shorten_a_phase():
    # sites that divide evenly into the cores: Ray counts the cores itself
    assert ray_cpus(2, cores=2) == (None, 1) and ray_cpus(4, cores=2) == (None, 1)
    assert ray_cpus(3, cores=8) == (None, 1) and ray_cpus(2, client_threads=2, cores=4) == (None, 2)
    # 3 sites on 2 cores: 3 workers share them (1.5 site-times a phase instead of 2)
    assert phase_units(3, 2, 2) == 2.0 and phase_units(3, 3, 2) == 1.5
    assert ray_cpus(3, cores=2) == (3, 1) and ray_cpus(5, cores=2) == (3, 1)
    assert ray_cpus(3, client_threads=2, cores=4) == (6, 2)
    for cores in range(1, 17):
        for threads in (1, 2, 3):
            slots = max(1, cores // threads)
            for sites in range(1, 40):
                total, per = ray_cpus(sites, client_threads=threads, cores=cores)
                workers = (total or cores) // per
                assert per == threads and 1 <= workers <= max(slots, min(sites, 2 * slots)), (cores, threads, sites)
                # never a longer phase than Ray's own pool, nor than any pool of up to two per slot
                best = min(phase_units(sites, w, slots) for w in range(1, max(slots, min(sites, 2 * slots)) + 1))
                assert phase_units(sites, workers, slots) == best, (cores, threads, sites)
    with pytest.raises(ValueError):
        ray_cpus(0, cores=2)


@pytest.mark.slow
def test_simulation_failure_is_reported_and_cleaned_up(tmp_path):
    sites = write_sites(tmp_path, "AB", cases=4)
    home = tmp_path / "flwr-home"
    with pytest.raises(SimulationError, match="strategy"):
        run_simulation(PROJECT, sites, {"num-server-rounds": 1, "strategy": "nonsense", "method-overrides": TINY},
                       out_dir=tmp_path / "out", flwr_home=home, stream=False, timeout=300)
    assert not pids_with_args("flower-superlink", str(home))


def ray_processes(root: int) -> dict[int, str]:
    """The Ray processes (GCS server, raylet, workers, agents) under ``root``: pid -> name."""
    found = {}
    for pid in child_pids(root):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if comm in ("gcs_server", "raylet") or comm.startswith("ray::") or b"/ray/" in cmdline:
            found[pid] = comm
    return found


@pytest.mark.slow
def test_sigterm_to_the_caller_stops_the_local_superlink(tmp_path):
    """While a simulation runs, the local SuperLink and Ray listen on loopback only; `kill` of a
    process inside run_simulation (e.g. `jras bench shift`) leaves no SuperLink behind."""
    sites = write_sites(tmp_path, "AB", cases=4)
    home = tmp_path / "flwr-home"
    script = (
        "from tools.simulate import run_simulation\n"
        f"run_simulation({str(PROJECT)!r}, {sites!r}, {{'num-server-rounds': 50, 'method-overrides': {TINY!r}}}, "
        f"out_dir={str(tmp_path / 'out')!r}, flwr_home={str(home)!r}, stream=False, timeout=600)\n"
    )
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(PROJECT)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not pids_with_args("flower-superlink", str(home)):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.5)
        assert pids_with_args("flower-superlink", str(home)), "the local SuperLink never started"
        (link,) = pids_with_args("flower-superlink", str(home))
        # Ray's raylet and GCS server come up with the simulation; then every socket of the
        # SuperLink's tree (Flower's APIs, Ray's GCS, raylet, object manager, workers) is on loopback
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not {"raylet", "gcs_server"} <= set(ray_processes(link).values()):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.5)
        ray = ray_processes(link)
        assert {"raylet", "gcs_server"} <= set(ray.values()), ray
        time.sleep(2)  # the raylet's and workers' ports open just after they start
        sockets = listening_sockets([link, *child_pids(link)])
        names = {s.pid: ray.get(s.pid, "flower") for s in sockets}
        assert {"raylet", "gcs_server"} <= set(names.values()), (sockets, ray)
        exposed = [(s, names[s.pid]) for s in sockets if not s.loopback]
        assert not exposed, exposed
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and pids_with_args("flower-superlink", str(home)):
            time.sleep(0.5)
        assert not pids_with_args("flower-superlink", str(home))
        assert proc.returncode != 0
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in pids_with_args("flower-superlink", str(home)):
            stop_pid(pid)


def test_site_table_names_partitions(tmp_path):
    sites = write_sites(tmp_path, "AB", cases=4)
    (tmp_path / "run" / "tensorboard").mkdir(parents=True)
    rec = {"round": 3, "sites": {
        "node-7": {"evaluate": {"dice_lv": 0.9, "dice_myo": 0.7, "dice_rv": 0.8, "dice_mean": 0.8,
                                "hd95_mean": 4.0, "guide_dice": 0.6, "partition-id": 1}},
        "node-3": {"evaluate": {"dice_lv": 0.5, "dice_myo": 0.4, "dice_rv": 0.3, "dice_mean": 0.4, "partition-id": 0}},
        "node-9": {"train": {"seg_loss": 1.0}},
    }}
    (tmp_path / "run" / "tensorboard" / "metrics.jsonl").write_text(json.dumps({"round": 2, "sites": {}}) + "\n" + json.dumps(rec) + "\n")
    rows = site_table(tmp_path / "run", sites)
    assert [(r["site"], r["node"]) for r in rows] == [("node-9", "node-9"), ("test-A", "node-3"), ("test-B", "node-7")]
    assert rows[2]["hd95_mean"] == 4.0 and rows[2]["guide_dice"] == 0.6 and "guide_dice" not in rows[1]
    text = format_site_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["site", "dice_lv", "dice_myo", "dice_rv", "dice_mean", "hd95_mean", "guide_dice"]
    assert "test-B" in text and "0.800" in text and "round 3" in text
    # without the site list (and no run-config.toml) sites keep their node ids
    assert {r["site"] for r in site_table(tmp_path / "run")} == {"node-3", "node-7", "node-9"}
