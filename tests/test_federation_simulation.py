"""One real run through Flower's Simulation Engine: ``flwr run`` against a managed
local SuperLink, 3 simulated sites, 2 rounds, tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, pids_with_args, stop_pid
from test_federation import TINY, write_sites

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def local_superlink_env(flwr_home, monkeypatch):
    """A ``:local:`` connection in a private FLWR_HOME, on free ports; the managed
    SuperLink that ``flwr run`` starts is found and stopped by PID afterwards."""
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
    )
    monkeypatch.setenv("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", str(free_port()))
    monkeypatch.setenv("FLWR_LOCAL_CONTROL_API_PORT", str(free_port()))
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    yield flwr_home
    for pid in pids_with_args("flower-superlink", str(flwr_home)):
        stop_pid(pid)


@pytest.mark.slow
def test_simulation_engine_run(tmp_path, local_superlink_env):
    sites = write_sites(tmp_path, "ABC", cases=4)
    out = tmp_path / "out"
    overrides = tmp_path / "run.toml"
    overrides.write_text(
        "num-server-rounds = 2\n"
        "min-nodes = 3\n"
        f'output-dir = "{out}"\n'
        'run-name = "sim"\n'
        f'method-overrides = "{TINY}"\n'
        f'sites = "{",".join(sites)}"\n'
    )
    cmd = [
        str(BIN / "flwr"), "run", str(PROJECT), "local",
        "--run-config", str(overrides),
        "--federation-config", "num-supernodes=3 client-resources-num-cpus=1",
        "--stream",
    ]
    res = subprocess.run(cmd, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    tail = (res.stdout + res.stderr)[-4000:]
    assert res.returncode == 0, tail
    run_dir = out / "sim"
    assert (run_dir / "checkpoint.pt").is_file(), tail
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    from server.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run_dir)
    assert ckpt.round == 2 and ckpt.run_config["num-server-rounds"] == 2
    rounds = [json.loads(x) for x in (run_dir / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["round_stats"]["num_sites_train"] == 3 and r["round_stats"]["num_sites_evaluate"] == 3
        assert r["round_stats"]["bytes_total"] > 0
        assert "dice_mean" in r["global"]["evaluate"]
