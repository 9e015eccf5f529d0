"""A real deployment on localhost, as ``docs/DEPLOYMENT.md`` sets it up: a SuperLink with TLS
and SuperNode authentication on loopback, and nginx as the public listener that forwards only
the Fleet API (``tools.proxy``). Through the public address ``flwr ls``, ``flwr supernode
register`` and ``flwr run`` are refused; on loopback they work. Two registered SuperNodes
train through the proxy for 2 rounds, a third is stopped while it trains in round 1 (the run
goes on with the two others), an unregistered SuperNode and one that trusts another CA are
refused. Then one SuperNode is killed hard (SIGKILL) and started again: the SuperLink refuses
it (exit 305) until it considers the old process gone, and it gets back in with its node id
(``tools.services.start_supernode``); the run is resumed from its checkpoint for a third
round with both sites. Every process is stopped by PID."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny_federation import TINY

from tools.processes import child_pids, free_port, listening_sockets, stop_pid
from tools.proxy import NginxProxy, ProxyConfig
from tools.services import READY_LINE, REFUSED_LINE, start_supernode, stop_supernode, superlink_argv, supernode_argv

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
    from jras_core.retrieval.crypto import generate_key_file

    path = folder / f"hospital-{vendor}.yaml"
    key = generate_key_file(folder / f"hospital-{vendor}.key")
    path.write_text(yaml.safe_dump({
        "name": f"hospital-{vendor}", "vendor": vendor, "val_fraction": 0.25,
        "data": {"kind": "synthetic", "vendor": vendor, "cases": 4, "seed": seed, "size": 64},
        "cache_dir": str(folder / f"cache-{vendor}"), "key_file": str(key),
    }))
    return path


def flwr(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], check=False, capture_output=True, text=True, timeout=120,
                          env=env, cwd=PROJECT)


def hard_kill(pid: int) -> None:
    """SIGKILL a process and its descendants at once, as a crash would end them."""
    for p in [pid, *child_pids(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "tensorboard" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_deployment_behind_the_proxy(tmp_path, flwr_home, processes, monkeypatch, nginx):
    from tools import pki

    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env = dict(os.environ)
    pki.create_ca(tmp_path / "ca")
    pki.create_server_cert(tmp_path / "ca", tmp_path / "server", ["localhost", "127.0.0.1"])
    keys = {name: pki.create_node_key(tmp_path / "keys" / f"{name}.key")
            for name in ("a", "b", "c", "intruder", "wrongca", "late")}
    ca = tmp_path / "ca" / pki.CA_CERT
    other_ca = pki.create_ca(tmp_path / "other-ca", common_name="Some other CA")[1]

    # the coordinator: the SuperLink on loopback, the proxy on the public address
    link_port, public_port = free_port(), free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{link_port}"\n'
        f'root-certificates = "{ca}"\n\n[superlink.public]\naddress = "127.0.0.1:{public_port}"\n'
        f'root-certificates = "{ca}"\n'
    )
    # the command lines of the systemd units (tools.services)
    link = processes("superlink", superlink_argv(BIN, ca, tmp_path / "server" / pki.SERVER_CERT,
                                                 tmp_path / "server" / pki.SERVER_KEY, f"127.0.0.1:{link_port}"),
                     cwd=tmp_path, env=env)
    wait_for_port(link_port, link)
    proxy = NginxProxy(ProxyConfig(
        listen=f"127.0.0.1:{public_port}", superlink=f"127.0.0.1:{link_port}", ca_cert=ca,
        server_cert=tmp_path / "server" / pki.SERVER_CERT, server_key=tmp_path / "server" / pki.SERVER_KEY,
        state_dir=tmp_path / "proxy"))
    with proxy:
        _federation(tmp_path, env, keys, ca, other_ca, link, public_port, processes)


def loopback_only(pid: int) -> None:
    """Every socket that ``pid`` and its descendants listen on is on loopback (and there is one)."""
    sockets = listening_sockets([pid, *child_pids(pid)])
    assert sockets and all(s.loopback for s in sockets), sockets


def _federation(tmp_path, env, keys, ca, other_ca, link, public_port, processes) -> None:
    loopback_only(link.pid)

    overrides = tmp_path / "run.toml"
    out = tmp_path / "out"
    overrides.write_text(
        "num-server-rounds = 2\nmin-nodes = 2\nround-timeout = 150\n"
        "fraction-evaluate = 0.0\n"  # each message starts a ClientApp process; evaluation runs in the simulation test
        f'output-dir = "{out}"\nrun-name = "deploy"\n'
        f'method-overrides = "{TINY}"\n'
    )
    # on loopback the coordinator's flwr works
    for name in ("a", "b", "c", "wrongca"):
        res = flwr(env, "supernode", "register", str(keys[name][1]), "deploy")
        assert res.returncode == 0, res.stdout + res.stderr

    def node_argv(key: Path, site: Path, retries: int = 10, wait: int = 60, root: Path = ca) -> list[str]:
        return supernode_argv(BIN, f"127.0.0.1:{public_port}", root, key, site, port=free_port(),
                              max_retries=retries, max_wait_time=wait)

    sites = {n: site_yaml(tmp_path, v, i) for i, (n, v) in enumerate((("a", "A"), ("b", "B")))}
    nodes = {n: processes(f"supernode-{n}", node_argv(keys[n][0], sites[n]), cwd=tmp_path, env=env)
             for n in ("a", "b")}
    doomed = processes("supernode-c", node_argv(keys["c"][0], site_yaml(tmp_path, "E", 7)), cwd=tmp_path, env=env)
    intruder = processes("supernode-intruder", node_argv(keys["intruder"][0], site_yaml(tmp_path, "C", 5),
                                                              retries=1, wait=5), cwd=tmp_path, env=env)
    # a registered key, but the node trusts another CA: the TLS handshake fails
    wrong_ca = processes("supernode-wrongca", node_argv(keys["wrongca"][0], site_yaml(tmp_path, "D", 6),
                                                             retries=1, wait=5, root=other_ca), cwd=tmp_path, env=env)

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
    # while the run goes on: through the public address the control plane is refused (no
    # runs listed, no key registered, no run started: nginx answers 403 for the Control API)
    refused = {
        "ls": flwr(env, "ls", "public"),
        "supernode register": flwr(env, "supernode", "register", str(keys["late"][1]), "public"),
        "run": flwr(env, "run", str(PROJECT), "public", "--run-config", str(overrides)),
    }
    for what, res in refused.items():
        assert res.returncode != 0 and "403" in res.stdout + res.stderr, (what, res.stdout, res.stderr)
    access = (tmp_path / "proxy" / "access.log").read_text()
    assert re.search(r'"POST /v1/control/list-runs HTTP/1.1" 403', access), access
    assert re.search(r'"POST /v1/control/register-node HTTP/1.1" 403', access), access
    listed = flwr(env, "supernode", "list", "deploy", "--format", "json")  # on loopback: a, b, c, wrongca only
    assert listed.returncode == 0 and len(json.loads(listed.stdout)["nodes"]) == 4, listed.stdout + listed.stderr
    try:
        run.wait(timeout=420)
    except subprocess.TimeoutExpired:
        pass
    tail = run.log_path.read_text()[-4000:]
    assert run.returncode == 0, tail
    for node in nodes.values():
        assert node.poll() is None, node.log_path.read_text()[-3000:]

    from server.checkpoint import load_checkpoint

    run_dir = out / "deploy"
    assert load_checkpoint(run_dir).round == 2, tail
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    rounds = metrics(run_dir)
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
    assert list((tmp_path / "cache-A").glob("*.slices-*.enc")) and list((tmp_path / "cache-B").glob("*.enc"))
    ls = flwr(env, "ls", "deploy")
    assert ls.returncode == 0 and "finished" in ls.stdout.lower(), ls.stdout + ls.stderr
    loopback_only(link.pid)  # the SuperLink and the ServerApp runner it started

    # the unregistered node was refused and gave up
    assert intruder.wait(timeout=60) != 0
    assert REFUSED_LINE in intruder.log_path.read_text()
    # the node that does not trust the SuperLink's certificate never joined
    assert wrong_ca.wait(timeout=60) != 0, wrong_ca.log_path.read_text()[-2000:]
    assert "CERTIFICATE_VERIFY_FAILED" in wrong_ca.log_path.read_text() or "certificate" in wrong_ca.log_path.read_text().lower()

    # site b's machine crashes (SIGKILL: no goodbye to the SuperLink) and b is started again
    # at once: refused while the SuperLink still counts the old process online, then in
    node_id = re.search(rf"{READY_LINE} (\d+)", nodes["b"].log_path.read_text()).group(1)
    hard_kill(nodes["b"].pid)
    nodes["b"].wait(timeout=10)
    killed = time.monotonic()
    restarted, refusals = start_supernode(node_argv(keys["b"][0], sites["b"]), tmp_path, "supernode-b-restart",
                                          env=env, cwd=tmp_path)
    try:
        rejoin_s = time.monotonic() - killed
        first_try = (tmp_path / "supernode-b-restart-0.log").read_text()
        assert refusals >= 1 and REFUSED_LINE in first_try and "305" in first_try, first_try[-2000:]
        assert re.search(rf"{READY_LINE} (\d+)", (tmp_path / f"supernode-b-restart-{refusals}.log").read_text()
                         ).group(1) == node_id
        print(f"\nrestarted SuperNode refused {refusals}x, in after {rejoin_s:.0f} s")

        # the server resumes the federation from its checkpoint: round 3, with b back
        more = tmp_path / "resume.toml"
        more.write_text(overrides.read_text().replace("num-server-rounds = 2", "num-server-rounds = 1")
                        + f'resume = "{run_dir}"\n')
        resumed = processes("flwr-run-resumed", [
            str(BIN / "flwr"), "run", str(PROJECT), "deploy", "--run-config", str(more), "--stream"],
            cwd=tmp_path, env=env)
        try:
            resumed.wait(timeout=300)
        except subprocess.TimeoutExpired:
            pass
        log_text = resumed.log_path.read_text()
        assert resumed.returncode == 0, log_text[-4000:]
        assert "resuming from round 2" in log_text, log_text[-4000:]
        assert load_checkpoint(run_dir).round == 3
        rounds = metrics(run_dir)
        assert [r["round"] for r in rounds] == [1, 2, 3]
        assert rounds[2]["round_stats"]["num_sites_train"] == 2 and rounds[2]["errors"] == {}, rounds[2]
        assert f"node-{node_id}" in rounds[2]["sites"], rounds[2]["sites"]
    finally:
        stop_supernode(restarted)
