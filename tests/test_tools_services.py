"""Service tooling (tools.services, tools.processes, `jras deploy systemd`): the SuperNode's
restart policy matches Flower's heartbeat, a refused process is started again until it is up,
listening sockets are found, and the systemd units run the same command lines as the tooling
and pass ``systemd-analyze verify``. (A real SuperNode killed and restarted:
``test_deployment.py``.)"""

from __future__ import annotations

import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tools import pki, services
from tools.cli import main
from tools.processes import StartRefused, listening_sockets, start_with_retry, stop_pid


def test_restart_policy_outlasts_flowers_heartbeat_patience():
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

    assert services.HEARTBEAT_INTERVAL_S == HEARTBEAT_DEFAULT_INTERVAL
    assert services.HEARTBEAT_PATIENCE == HEARTBEAT_PATIENCE
    online_after_crash = HEARTBEAT_DEFAULT_INTERVAL * HEARTBEAT_PATIENCE
    assert services.REJOIN_WINDOW_S > online_after_crash
    # systemd: the starts of one burst, RestartSec apart, reach past the window, within the interval
    assert (services.START_LIMIT_BURST - 1) * services.RESTART_SEC > services.REJOIN_WINDOW_S
    assert services.START_LIMIT_INTERVAL_S > services.START_LIMIT_BURST * services.RESTART_SEC


def _attempts(tmp_path: Path, refusals: int):
    """start(attempt): a shell that prints 'refused' and exits 1 for the first ``refusals``
    attempts, then prints 'ready' and stays up."""
    procs: list[subprocess.Popen] = []

    def start(attempt: int) -> subprocess.Popen:
        log = tmp_path / f"try-{attempt}.log"
        script = "echo refused; exit 1" if attempt < refusals else "echo ready; exec sleep 60"
        with open(log, "wb") as fh:
            procs.append(subprocess.Popen(["sh", "-c", script], stdout=fh, stderr=subprocess.STDOUT))
        procs[-1].log = log  # type: ignore[attr-defined]
        return procs[-1]

    def said(word: str):
        return lambda proc: word in proc.log.read_text()

    return start, said("ready"), said("refused"), procs


def test_start_with_retry(tmp_path):
    start, ready, refused, procs = _attempts(tmp_path, refusals=2)
    proc, n = start_with_retry(start, ready, refused, window=10, every=0.1, poll=0.02)
    try:
        assert n == 2 and proc.poll() is None and len(procs) == 3
    finally:
        stop_pid(proc.pid)
    # refused for longer than the window: given up (the attempt under way when the window
    # ends may not have exited yet on a busy machine: then it is stopped)
    start, ready, refused, procs = _attempts(tmp_path, refusals=100)
    with pytest.raises(StartRefused, match="still refused|was not up"):
        start_with_retry(start, ready, refused, window=1.0, every=0.1, poll=0.02)
    assert len(procs) > 1 and all(p.poll() is not None for p in procs)
    # an exit that is not a refusal is not retried
    start, ready, _, procs = _attempts(tmp_path, refusals=5)
    with pytest.raises(StartRefused, match="not refused"):
        start_with_retry(start, ready, lambda proc: False, window=10, every=0.1, poll=0.02)
    assert len(procs) == 1


def test_listening_sockets_of_this_process():
    with socket.socket() as lo, socket.socket() as anywhere:
        lo.bind(("127.0.0.1", 0))
        lo.listen()
        anywhere.bind(("0.0.0.0", 0))  # noqa: S104 - the test's point
        anywhere.listen()
        found = {s.port: s for s in listening_sockets([__import__("os").getpid()])}
        assert found[lo.getsockname()[1]].loopback
        assert not found[anywhere.getsockname()[1]].loopback


def _units(folder: Path) -> dict[str, dict[str, list[str]]]:
    """Each unit file's sections as {section: [key=value lines]}."""
    out: dict[str, dict[str, list[str]]] = {}
    for path in sorted(folder.glob("*.service")):
        sections: dict[str, list[str]] = {}
        current = ""
        for line in path.read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            if line.startswith("["):
                current = line.strip("[]")
                sections[current] = []
            else:
                sections[current].append(line)
        out[path.name] = sections
    return out


def _value(unit: dict[str, list[str]], section: str, key: str) -> str:
    (value,) = [line.split("=", 1)[1] for line in unit[section] if line.split("=", 1)[0] == key]
    return value


def test_systemd_units_run_what_the_tooling_runs(tmp_path, capsys):
    pki.create_ca(tmp_path / "ca")
    pki.create_server_cert(tmp_path / "ca", tmp_path / "server", ["localhost", "127.0.0.1"])
    key, _ = pki.create_node_key(tmp_path / "site.key")
    site = tmp_path / "site.yaml"
    site.write_text("name: x\n")
    bin_dir = Path(sys.executable).parent
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"  # the unit names it; it need not be installed here
    assert main(["deploy", "systemd", "coordinator", "--ca", str(tmp_path / "ca"), "--server", str(tmp_path / "server"),
                 "--proxy-conf", str(tmp_path / "nginx.conf"), "--proxy-state-dir", str(tmp_path / "proxy"),
                 "--nginx", nginx, "--bin-dir", str(bin_dir), "--out", str(tmp_path / "units")]) == 0
    assert main(["deploy", "systemd", "site", "--superlink", "coordinator.example.org:8000", "--ca-cert",
                 str(tmp_path / "ca" / pki.CA_CERT), "--key", str(key), "--site", str(site), "--writable",
                 str(tmp_path / "cache"), "--allow-ip", "10.0.0.5", "--bin-dir", str(bin_dir),
                 "--out", str(tmp_path / "units")]) == 0
    assert "systemctl enable --now" in capsys.readouterr().out
    units = _units(tmp_path / "units")
    assert set(units) == {services.SUPERLINK_UNIT, services.PROXY_UNIT, services.SUPERNODE_UNIT}

    link = units[services.SUPERLINK_UNIT]
    assert shlex.split(_value(link, "Service", "ExecStart")) == services.superlink_argv(
        bin_dir, tmp_path / "ca" / pki.CA_CERT, tmp_path / "server" / pki.SERVER_CERT,
        tmp_path / "server" / pki.SERVER_KEY, "127.0.0.1:9092", database="/var/lib/jras/superlink.db")
    assert _value(link, "Service", "StateDirectory") == "jras"
    assert "--host 127.0.0.1" in _value(link, "Service", "ExecStart")  # loopback only
    proxy = units[services.PROXY_UNIT]
    assert shlex.split(_value(proxy, "Service", "ExecStart")) == [
        nginx, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path / "proxy"), "-e", "stderr"]
    assert services.SUPERLINK_UNIT in _value(proxy, "Unit", "After")

    node = units[services.SUPERNODE_UNIT]
    # systemd unquotes "site-config=\"...\"" as the shell does
    assert shlex.split(_value(node, "Service", "ExecStart")) == services.supernode_argv(
        bin_dir, "coordinator.example.org:8000", tmp_path / "ca" / pki.CA_CERT, key, site)
    assert _value(node, "Service", "Restart") == "on-failure"
    assert int(_value(node, "Service", "RestartSec")) == services.RESTART_SEC
    assert int(_value(node, "Unit", "StartLimitBurst")) == services.START_LIMIT_BURST
    assert int(_value(node, "Unit", "StartLimitIntervalSec")) == services.START_LIMIT_INTERVAL_S
    assert _value(node, "Service", "User") == "jras-site" and _value(node, "Service", "ProtectSystem") == "strict"
    assert str(tmp_path / "cache") in _value(node, "Service", "ReadWritePaths")
    assert _value(node, "Service", "IPAddressAllow") == "localhost 10.0.0.5"
    for unit in (link, node):  # Flower's executables of this environment, offline
        assert Path(shlex.split(_value(unit, "Service", "ExecStart"))[0]).is_file()
        assert {"Environment=FLWR_TELEMETRY_ENABLED=0", "Environment=FLWR_DISABLE_UPDATE_CHECK=1",
                f"Environment=PATH={bin_dir}:/usr/local/bin:/usr/bin:/bin"} <= set(unit["Service"])

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed: the units were checked by parsing only")
    if not Path(nginx).is_file():
        (tmp_path / "units" / services.PROXY_UNIT).unlink()  # its ExecStart cannot be verified here
    res = subprocess.run([analyze, "verify", *map(str, sorted((tmp_path / "units").glob("*.service")))],
                         capture_output=True, text=True, check=False, timeout=60)
    complaints = [line for line in res.stderr.splitlines()
                  if any(w in line for w in ("Unknown", "Failed to parse", "not executable", "Invalid", "Missing"))]
    assert res.returncode == 0 and not complaints, res.stderr


def test_systemd_site_needs_its_yaml(tmp_path, capsys):
    assert main(["deploy", "systemd", "site", "--superlink", "c:8000", "--ca-cert", "ca.crt", "--key", "k",
                 "--site", str(tmp_path / "missing.yaml"), "--out", str(tmp_path)]) == 2
    assert "site YAML not found" in capsys.readouterr().err
