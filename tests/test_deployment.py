"""A real deployment on localhost: a SuperLink with TLS and SuperNode authentication,
two registered SuperNodes serving site YAMLs, ``flwr run`` for 2 training rounds,
a third registered SuperNode killed by PID while it trains in round 1 (the run goes on
with the two others), and an unregistered SuperNode that is refused. Every process is
stopped by PID."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny_federation import TINY

from tools.processes import child_pids, free_port, stop_pid

PROJECT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode}: {proc.log_path.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")


def site_yaml(folder: Path, vendor: str, seed: int) -> Path:
    path = folder / f"hospital-{vendor}.yaml"
    path.write_text(yaml.safe_dump({
        "name": f"hospital-{vendor}", "vendor": vendor, "val_fraction": 0.25,
        "data": {"kind": "synthetic", "vendor": vendor, "cases": 4, "seed": seed, "size": 64},
        "cache_dir": str(folder / f"cache-{vendor}"),
    }))
    return path


@pytest.mark.slow
def test_tls_authenticated_deployment(tmp_path, flwr_home, processes, monkeypatch):
    from tools import pki

    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env = dict(os.environ)
    pki.create_ca(tmp_path / "ca")
    pki.create_server_cert(tmp_path / "ca", tmp_path / "server", ["localhost", "127.0.0.1"])
    keys = {name: pki.create_node_key(tmp_path / "keys" / f"{name}.key") for name in ("a", "b", "c", "intruder", "wrongca")}
    ca = tmp_path / "ca" / pki.CA_CERT
    other_ca = pki.create_ca(tmp_path / "other-ca", common_name="Some other CA")[1]

    port = free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{ca}"\n'
    )
    link = processes("superlink", [
        str(BIN / "flower-superlink"),
        "--ssl-ca-certfile", str(ca),
        "--ssl-certfile", str(tmp_path / "server" / pki.SERVER_CERT),
        "--ssl-keyfile", str(tmp_path / "server" / pki.SERVER_KEY),
        "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(port),
    ], cwd=tmp_path, env=env)
    wait_for_port(port, link)

    for name in ("a", "b", "c", "wrongca"):
        res = subprocess.run(
            [str(BIN / "flwr"), "supernode", "register", str(keys[name][1]), "deploy"],
            check=False, capture_output=True, text=True, timeout=60, env=env,
        )
        assert res.returncode == 0, res.stdout + res.stderr

    def supernode(name: str, key: Path, site: Path, retries: int = 10, wait: int = 60,
                  root: Path = ca) -> subprocess.Popen:
        return processes(f"supernode-{name}", [
            str(BIN / "flower-supernode"),
            "--superlink", f"127.0.0.1:{port}",
            "--root-certificates", str(root),
            "--auth-supernode-private-key", str(key),
            "--node-config", f'site-config="{site}"',
            "--port", str(free_port()),
            "--max-retries", str(retries), "--max-wait-time", str(wait),
        ], cwd=tmp_path, env=env)

    nodes = [supernode(n, keys[n][0], site_yaml(tmp_path, v, i)) for i, (n, v) in enumerate((("a", "A"), ("b", "B")))]
    doomed = supernode("c", keys["c"][0], site_yaml(tmp_path, "E", 7))
    intruder = supernode("intruder", keys["intruder"][0], site_yaml(tmp_path, "C", 5), retries=1, wait=5)
    # a registered key, but the node trusts another CA: the TLS handshake fails
    wrong_ca = supernode("wrongca", keys["wrongca"][0], site_yaml(tmp_path, "D", 6), retries=1, wait=5, root=other_ca)

    out = tmp_path / "out"
    overrides = tmp_path / "run.toml"
    overrides.write_text(
        "num-server-rounds = 2\nmin-nodes = 2\nround-timeout = 150\n"
        "fraction-evaluate = 0.0\n"  # each message starts a ClientApp process; evaluation runs in the simulation test
        f'output-dir = "{out}"\nrun-name = "deploy"\n'
        f'method-overrides = "{TINY}"\n'
    )
    run = processes("flwr-run", [str(BIN / "flwr"), "run", str(PROJECT), "deploy", "--run-config", str(overrides),
                                 "--stream"], cwd=tmp_path, env=env)

    def training(pid: int) -> bool:
        for child in child_pids(pid):
            try:
                if b"flwr-clientapp" in Path(f"/proc/{child}/cmdline").read_bytes():
                    return True
            except OSError:
                pass
        return False

    # site c crashes while it trains in round 1: its SuperNode and ClientApp are killed
    deadline = time.monotonic() + 300
    while not training(doomed.pid) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert training(doomed.pid), run.log_path.read_text()[-3000:]
    stop_pid(doomed.pid)
    try:
        run.wait(timeout=420)
    except subprocess.TimeoutExpired:
        pass
    tail = run.log_path.read_text()[-4000:]
    assert run.returncode == 0, tail
    for node in nodes:
        assert node.poll() is None, node.log_path.read_text()[-3000:]

    from server.checkpoint import load_checkpoint

    run_dir = out / "deploy"
    assert load_checkpoint(run_dir).round == 2, tail
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    rounds = [json.loads(x) for x in (run_dir / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    # round 1: c's reply never came (the SuperLink answers for a node that left, else the
    # round timeout ends the wait); logged with its text; the two others were aggregated
    first = rounds[0]["round_stats"]
    assert first.get("failures_train", 0) + first.get("timeouts_train", 0) == 1, rounds[0]
    assert "aggregate_skipped" not in first and len(rounds[0]["errors"]) == 1, rounds[0]
    assert "round 1: train" in tail or "round 1: train" in run.log_path.read_text()
    for r in rounds:
        assert r["round_stats"]["num_sites_train"] == 2 and len(r["sites"]) == 2
    assert rounds[1]["round_stats"].get("failures_train", 0) == 0 and rounds[1]["errors"] == {}
    assert (tmp_path / "cache-A").is_dir() and (tmp_path / "cache-B").is_dir()

    # the unregistered node was refused and gave up
    assert intruder.wait(timeout=60) != 0
    assert "Failed to activate SuperNode" in intruder.log_path.read_text()
    # the node that does not trust the SuperLink's certificate never joined
    assert wrong_ca.wait(timeout=60) != 0, wrong_ca.log_path.read_text()[-2000:]
    assert "CERTIFICATE_VERIFY_FAILED" in wrong_ca.log_path.read_text() or "certificate" in wrong_ca.log_path.read_text().lower()
