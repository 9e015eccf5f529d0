"""The deployment's long-running services and how they are restarted.

**A SuperNode restarted after a hard kill.** A SuperNode tells the SuperLink it is alive
with a heartbeat every :data:`HEARTBEAT_INTERVAL_S` (Flower 1.42 fixes the interval at
30 s); the SuperLink keeps a node *online* for :data:`HEARTBEAT_PATIENCE` intervals after
its last heartbeat and refuses to activate a node that is still online. A SuperNode that
stops normally deactivates itself, but one killed hard (``kill -9``, a crash, a power cut)
cannot, so the same node started again within that time is refused: it logs
:data:`REFUSED_LINE` (HTTP 412, Flower error 2004, ``Exit Code: 305``) and exits (status 1).
Nothing is wrong; it has to be started again once the SuperLink considers the old
process gone, at most :data:`REJOIN_WINDOW_S` after the kill. It then gets its old node id
back (the id belongs to its registered key).

:func:`start_supernode` does that on this machine: it starts ``flower-supernode`` and
starts it again every :data:`RESTART_SEC` while it is refused, up to
:data:`REJOIN_WINDOW_S`. The systemd unit of a site (:func:`systemd_units`) does the same
with ``Restart=on-failure``, ``RestartSec=`` :data:`RESTART_SEC` and a start limit that
outlasts the window. (The same exit code is given to a node whose key is not registered; it
is then retried for the window and given up.)

No Flower import here.
"""

from __future__ import annotations

import logging
import math
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from tools.processes import StartRefused, start_with_retry, stop_pid

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 30
"""Seconds between a SuperNode's heartbeats (Flower 1.42's ``HEARTBEAT_DEFAULT_INTERVAL``)."""

HEARTBEAT_PATIENCE = 2
"""Heartbeat intervals the SuperLink keeps a silent node online (Flower's ``HEARTBEAT_PATIENCE``)."""

REFUSED_LINE = "Failed to activate SuperNode"
"""What a SuperNode logs when the SuperLink refused to activate it (Flower's exit code 305,
``SUPERNODE_CONNECTION_ERROR``; the process itself exits with status 1): the node is still
online from before, or its key is not registered."""

RESTART_SEC = 10
"""Seconds between starts of a refused SuperNode (systemd ``RestartSec``)."""

REJOIN_WINDOW_S = HEARTBEAT_INTERVAL_S * HEARTBEAT_PATIENCE + 40
"""Seconds after a hard kill within which a restarted SuperNode gets in: the SuperLink's
patience plus a margin for the attempt under way when it runs out (``RESTART_SEC`` and the
SuperNode's start, a few seconds on a busy machine; the localhost test measured 71 s on
2 loaded cores)."""

START_LIMIT_BURST = math.ceil(REJOIN_WINDOW_S / RESTART_SEC) + 2
"""systemd ``StartLimitBurst`` of a SuperNode: more starts than fit into the window."""

START_LIMIT_INTERVAL_S = 300
"""systemd ``StartLimitIntervalSec`` of a SuperNode (longer than the burst's starts take)."""

READY_LINE = "SuperNode ID:"
"""What a SuperNode logs once the SuperLink activated it."""


class SuperNodeError(RuntimeError):
    """A SuperNode did not get in (refused for longer than the window, or failed otherwise)."""


def start_supernode(
    argv: Sequence[str],
    log_dir: str | Path,
    name: str,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    window: float = REJOIN_WINDOW_S,
    every: float = RESTART_SEC,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``flower-supernode`` (``argv``) until the SuperLink activates it.

    Each attempt writes ``log_dir/<name>-<attempt>.log``. An attempt that exits having
    logged :data:`REFUSED_LINE` (before :data:`READY_LINE`) is started again
    ``every`` seconds later, for up to ``window`` seconds. The caller stops the returned
    process (by PID, e.g. :func:`tools.processes.stop_pid`).

    Returns:
        ``(process, refused)``: the running SuperNode and how many attempts were refused.

    Raises:
        SuperNodeError: refused for longer than ``window``, or it exited for another reason;
            the message holds the last attempt's log tail.
    """
    folder = Path(log_dir)
    folder.mkdir(parents=True, exist_ok=True)
    handles: dict[int, IO[bytes]] = {}

    def log_path(attempt: int) -> Path:
        return folder / f"{name}-{attempt}.log"

    def start(attempt: int) -> subprocess.Popen[bytes]:
        handles[attempt] = open(log_path(attempt), "wb")  # noqa: SIM115 - closed below
        return subprocess.Popen(list(argv), stdout=handles[attempt], stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(env) if env is not None else None, cwd=cwd)

    def logged(line: str) -> bool:
        return line in log_path(max(handles)).read_text(errors="replace")

    def ready(proc: subprocess.Popen[bytes]) -> bool:  # noqa: ARG001 - the latest attempt's log tells
        return logged(READY_LINE)

    def turned_away(proc: subprocess.Popen[bytes]) -> bool:  # noqa: ARG001
        return logged(REFUSED_LINE)

    try:
        proc, refused = start_with_retry(start, ready, turned_away, window=window, every=every)
    except StartRefused as exc:
        last = max(handles) if handles else 0
        tail = log_path(last).read_text(errors="replace")[-2000:] if handles else ""
        raise SuperNodeError(f"SuperNode {name}: {exc}; see {log_path(last)}:\n{tail}") from None
    finally:
        for fh in handles.values():
            fh.close()  # each process keeps its own copy of the descriptor
    if refused:
        log.info("SuperNode %s got in after %d refused attempts (%s)", name, refused, log_path(refused))
    return proc, refused


def stop_supernode(proc: subprocess.Popen[bytes]) -> None:
    """Stop a SuperNode from :func:`start_supernode` (and its SuperExec) by PID."""
    stop_pid(proc.pid)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


# --------------------------------------------------------------------------- command lines


SUPERLINK_LOOPBACK = "127.0.0.1:9092"
"""The coordinator's SuperLink address behind the proxy (``HOST:PORT`` on loopback), the default
of the proxy's upstream and of the SuperLink's unit alike."""

PROXY_STATE_DIR = "/var/lib/jras-proxy"
"""The proxy's (nginx's) default prefix folder: pid file, access log, temporary files."""


def superlink_argv(
    bin_dir: str | Path,
    ca_cert: str | Path,
    server_cert: str | Path,
    server_key: str | Path,
    address: str = SUPERLINK_LOOPBACK,
    database: str | Path | None = None,
) -> list[str]:
    """The coordinator's ``flower-superlink``: TLS, SuperNode authentication, on the loopback
    ``address`` (``HOST:PORT``) behind the proxy; ``database`` keeps its state across restarts."""
    host, _, port = address.rpartition(":")
    argv = [
        str(Path(bin_dir) / "flower-superlink"),
        "--ssl-ca-certfile", str(ca_cert), "--ssl-certfile", str(server_cert), "--ssl-keyfile", str(server_key),
        "--enable-supernode-auth", "--host", host, "--port", port,
    ]
    return argv + (["--database", str(database)] if database else [])


def supernode_argv(
    bin_dir: str | Path,
    superlink: str,
    ca_cert: str | Path,
    node_key: str | Path,
    site_yaml: str | Path,
    port: int | None = None,
    max_retries: int | None = None,
    max_wait_time: float | None = None,
) -> list[str]:
    """A site's ``flower-supernode``: dials ``superlink`` (the coordinator's public
    ``HOST:PORT``, the proxy) with TLS checked against ``ca_cert``, authenticates with
    ``node_key`` and serves the site YAML ``site_yaml`` (an absolute path). ``port``: its
    local API port (default Flower's 9094); ``max_retries``/``max_wait_time`` bound how long
    an unreachable SuperLink is retried (default: for ever, as a service wants)."""
    argv = [
        str(Path(bin_dir) / "flower-supernode"),
        "--superlink", superlink,
        "--root-certificates", str(ca_cert),
        "--auth-supernode-private-key", str(node_key),
        "--node-config", f'site-config="{site_yaml}"',
    ]
    if port is not None:
        argv += ["--port", str(port)]
    if max_retries is not None:
        argv += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        argv += ["--max-wait-time", f"{max_wait_time:g}"]
    return argv


# --------------------------------------------------------------------------- systemd units

SUPERLINK_UNIT = "jras-superlink.service"
PROXY_UNIT = "jras-proxy.service"
SUPERNODE_UNIT = "jras-supernode.service"

_FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
}


def _exec(argv: Sequence[str]) -> str:
    """A command line as systemd's ``ExecStart=`` reads it: each word double-quoted where it
    holds a space, a quote, a backslash or a ``$`` or ``%`` (systemd's specifier)."""
    words = []
    for word in argv:
        word = word.replace("%", "%%")
        if any(c in word for c in ' "\\$\'') or not word:
            word = '"' + word.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$") + '"'
        words.append(word)
    return " ".join(words)


def _environment(bin_dir: Path, flwr_home: Path) -> str:
    env = {"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "FLWR_HOME": str(flwr_home), **_FLOWER_ENV}
    return "\n".join(f"Environment={k}={v}" for k, v in env.items())


def _state_directory(state: Path) -> str:
    """``StateDirectory=`` for a folder under ``/var/lib`` (systemd creates it, owned by the
    unit's user), else nothing (the folder must exist)."""
    try:
        return f"StateDirectory={state.relative_to('/var/lib')}\n"
    except ValueError:
        return ""


def coordinator_units(
    bin_dir: str | Path,
    ca_cert: str | Path,
    server_cert: str | Path,
    server_key: str | Path,
    proxy_conf: str | Path,
    proxy_state_dir: str | Path,
    nginx: str,
    superlink: str = SUPERLINK_LOOPBACK,
    state_dir: str | Path = "/var/lib/jras",
    user: str = "jras",
) -> dict[str, str]:
    """The coordinator's systemd units: :data:`SUPERLINK_UNIT` (loopback, TLS, node
    authentication, state in ``state_dir/superlink.db``, run as ``user``) and
    :data:`PROXY_UNIT` (nginx with ``proxy_conf`` from ``jras deploy proxy-config``).
    Both restart on failure; the proxy answers 502 while the SuperLink restarts, and
    SuperNodes retry. Returns ``{file name: text}``."""
    bin_dir, state = Path(bin_dir), Path(state_dir)
    link = superlink_argv(bin_dir, ca_cert, server_cert, server_key, superlink, database=state / "superlink.db")
    from tools.proxy import split_address

    split_address(superlink, "superlink")
    conf, proxy_state = Path(proxy_conf), Path(proxy_state_dir)
    nginx_argv = [nginx, "-c", str(conf), "-p", str(proxy_state), "-e", "stderr"]
    return {
        SUPERLINK_UNIT: f"""\
# J-RAS coordinator: the Flower SuperLink, on loopback only (written by `jras deploy systemd coordinator`).
# Sites reach its Fleet API through {PROXY_UNIT}; `flwr` on this machine dials {superlink}.
[Unit]
Description=J-RAS coordinator: Flower SuperLink on {superlink}
After=network.target

[Service]
Type=simple
User={user}
{_state_directory(state)}WorkingDirectory={state}
{_environment(bin_dir, state / "flwr-home")}
ExecStart={_exec(link)}
Restart=on-failure
RestartSec=5
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=full

[Install]
WantedBy=multi-user.target
""",
        PROXY_UNIT: f"""\
# J-RAS coordinator: the public TLS listener, forwarding only the Fleet API to the SuperLink
# (written by `jras deploy systemd coordinator`; configuration from `jras deploy proxy-config`).
[Unit]
Description=J-RAS coordinator: nginx forwarding the Fleet API to {superlink}
After=network-online.target {SUPERLINK_UNIT}
Wants=network-online.target {SUPERLINK_UNIT}

[Service]
Type=simple
ExecStartPre={_exec([*nginx_argv, "-t"])}
ExecStart={_exec(nginx_argv)}
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=5
PrivateTmp=yes
ProtectSystem=full
ReadWritePaths={proxy_state}

[Install]
WantedBy=multi-user.target
""",
    }


def site_unit(
    bin_dir: str | Path,
    superlink: str,
    ca_cert: str | Path,
    node_key: str | Path,
    site_yaml: str | Path,
    writable: Sequence[str | Path],
    state_dir: str | Path = "/var/lib/jras-site",
    user: str = "jras-site",
    allow_ips: Sequence[str] = (),
) -> dict[str, str]:
    """A site's systemd unit :data:`SUPERNODE_UNIT`: the SuperNode as ``user``, restarted
    every :data:`RESTART_SEC` s on failure (a refused activation after a crash too) with a
    start limit (:data:`START_LIMIT_BURST` starts in :data:`START_LIMIT_INTERVAL_S` s) that
    outlasts :data:`REJOIN_WINDOW_S`. The file system is read-only to it but for ``state_dir``
    (Flower's home: the installed apps) and ``writable`` (the site's cache folder); with
    ``allow_ips`` (the coordinator's addresses) it may reach those and loopback only.
    Returns ``{file name: text}``."""
    bin_dir, state = Path(bin_dir), Path(state_dir)
    argv = supernode_argv(bin_dir, superlink, ca_cert, node_key, site_yaml)
    rw = " ".join(str(p) for p in [state, *writable])
    network = (f"IPAddressDeny=any\nIPAddressAllow=localhost {' '.join(allow_ips)}\n" if allow_ips else "")
    return {
        SUPERNODE_UNIT: f"""\
# J-RAS site: the Flower SuperNode (written by `jras deploy systemd site`).
# A SuperNode restarted within {HEARTBEAT_INTERVAL_S * HEARTBEAT_PATIENCE} s of a crash is refused until the SuperLink
# counts the old process gone; it is started again every {RESTART_SEC} s until it gets in.
[Unit]
Description=J-RAS site: Flower SuperNode for {superlink}
After=network-online.target
Wants=network-online.target
StartLimitIntervalSec={START_LIMIT_INTERVAL_S}
StartLimitBurst={START_LIMIT_BURST}

[Service]
Type=simple
User={user}
{_state_directory(state)}WorkingDirectory={state}
{_environment(bin_dir, state / "flwr-home")}
ExecStart={_exec(argv)}
Restart=on-failure
RestartSec={RESTART_SEC}
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=strict
ProtectHome=read-only
ReadWritePaths={rw}
{network}
[Install]
WantedBy=multi-user.target
""",
    }


def write_units(units: Mapping[str, str], out_dir: str | Path) -> list[Path]:
    """Write ``{file name: text}`` into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in units.items():
        (out / name).write_text(text)
        paths.append(out / name)
    return paths
