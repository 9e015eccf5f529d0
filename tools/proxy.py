"""The coordinator's public listener: an nginx reverse proxy that forwards only the Fleet API.

Flower 1.42's SuperLink serves all of its HTTP APIs on one port: the Fleet API that
SuperNodes use (``/v1/fleet/...``), the Control API of the ``flwr`` command
(``/v1/control/...``: list and start runs, register SuperNode keys) and the Runtime API of
its own ServerApp processes (``/v1/runtime/...``). The Control API has no user
authentication in this distribution, so whoever reaches the port can start a run whose
ClientApp executes at every site. The SuperLink therefore listens on loopback only, and
nginx terminates TLS on the public address with the coordinator's certificate and forwards
``POST /v1/fleet/<endpoint>`` (and nothing else) to it, re-encrypted with TLS to the
loopback SuperLink (``--enable-supernode-auth`` requires TLS on the SuperLink). Every other
path gets 403. SuperNode authentication is unchanged: each request carries the node's
signed headers (``flwr-public-key``, ``flwr-timestamp``, ``flwr-signature``), which nginx
passes through and the SuperLink verifies.

* :class:`ProxyConfig`: the validated settings (addresses, PKI files, state folder).
* :func:`render_nginx_conf` / :func:`write_nginx_conf`: the nginx configuration.
* :func:`nginx_command`, :func:`check_nginx_conf`: how it is run and checked (``nginx -t``).
* :class:`NginxProxy`: a running proxy on this machine (a context manager), stopped by PID.

No Flower import here.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID

from tools.processes import Started, stop_pid

log = logging.getLogger(__name__)

FLEET_LOCATION = r"^/v1/fleet/[a-z][a-z-]*$"
"""The only request paths the proxy forwards (POST only): Flower 1.42's Fleet API endpoints
(``/v1/fleet/pull-messages``, ``/v1/fleet/push-object``, ...)."""

NGINX_CONF = "nginx.conf"

UPSTREAM_NAME = "localhost"
"""The name the proxy checks the loopback SuperLink's certificate against (a DNS name: nginx
does not match IP addresses); the coordinator's certificate must carry it."""


class ProxyError(RuntimeError):
    """The proxy's settings are inconsistent, nginx is missing, or nginx failed to start."""


def split_address(address: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as ``(host, port)``; ``what`` names it in errors."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ProxyError(f"{what}: expected HOST:PORT, got {address!r}")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cert_names(cert_path: Path) -> list[str]:
    """The DNS names and IP addresses (as text) of a certificate's subject alternative names."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ProxyError(f"{cert_path}: not a readable PEM certificate ({exc})") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


@dataclass(frozen=True)
class ProxyConfig:
    """Settings of the coordinator's proxy.

    Args:
        listen: public ``HOST:PORT`` the sites dial (e.g. ``0.0.0.0:8443``).
        superlink: the SuperLink's loopback ``HOST:PORT`` (its ``--host``/``--port``).
        ca_cert: the federation's CA certificate (``jras pki ca``): the proxy checks the
            loopback SuperLink's certificate against it.
        server_cert: the coordinator's certificate (``jras pki server-cert``), presented to
            the sites and by the SuperLink; its names must include the SuperLink's loopback host.
        server_key: its private key.
        state_dir: nginx's prefix folder (pid file, access log, temporary files).
        max_body_mib: largest request body accepted (a Fleet request carries one object
            chunk of at most 5 MiB, or a message's metadata).
        timeout_s: seconds nginx waits on the SuperLink for one request.
    """

    listen: str
    superlink: str
    ca_cert: Path
    server_cert: Path
    server_key: Path
    state_dir: Path
    max_body_mib: int = 64
    timeout_s: int = 300

    def __post_init__(self) -> None:
        for name in ("ca_cert", "server_cert", "server_key", "state_dir"):
            object.__setattr__(self, name, Path(getattr(self, name)).expanduser().resolve())
        public = split_address(self.listen, "--listen")
        host, port = split_address(self.superlink, "--superlink")
        if public[1] == port and (public[0] == host or public[0] in ("0.0.0.0", "::")):  # noqa: S104
            raise ProxyError(f"--listen {self.listen} and --superlink {self.superlink} take the same port")
        if not _is_loopback(host):
            raise ProxyError(f"--superlink {self.superlink}: the SuperLink must listen on a loopback address "
                             "(127.0.0.1), the proxy being its only public side")
        missing = [str(p) for p in (self.ca_cert, self.server_cert, self.server_key) if not p.is_file()]
        if missing:
            raise ProxyError(f"{', '.join(missing)} not found (create them with `jras pki ca` and `jras pki server-cert`)")
        if self.max_body_mib < 6:
            raise ProxyError(f"max_body_mib must be at least 6 (a Fleet object chunk is up to 5 MiB), got {self.max_body_mib}")
        if self.timeout_s < 1:
            raise ProxyError(f"timeout_s must be at least 1, got {self.timeout_s}")
        names = cert_names(self.server_cert)
        # nginx checks an upstream's certificate against a DNS name only (not an IP address)
        lacking = [n for n in dict.fromkeys((UPSTREAM_NAME, host)) if n not in names]
        if lacking:
            raise ProxyError(f"{self.server_cert} is valid for {', '.join(names) or 'no names'}, not for "
                             f"{' and '.join(lacking)}: the proxy checks the loopback SuperLink's certificate as "
                             f"{UPSTREAM_NAME} and the coordinator's `flwr` dials {host}; recreate it with "
                             + " ".join(f"--host {n}" for n in lacking) + " added (`jras pki server-cert`)")
        ca = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        cert = x509.load_pem_x509_certificate(self.server_cert.read_bytes())
        try:
            cert.verify_directly_issued_by(ca)
        except (InvalidSignature, ValueError, TypeError) as exc:
            raise ProxyError(f"{self.server_cert} is not signed by {self.ca_cert} ({type(exc).__name__})") from None
        try:
            usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            if ExtendedKeyUsageOID.SERVER_AUTH not in usages:
                raise ProxyError(f"{self.server_cert} is not a server certificate (no serverAuth usage)")
        except x509.ExtensionNotFound:
            pass


def render_nginx_conf(cfg: ProxyConfig) -> str:
    """The whole nginx configuration of the proxy (run with :func:`nginx_command`)."""
    state = cfg.state_dir
    listen_host, listen_port = split_address(cfg.listen, "--listen")
    listen = f"[{listen_host}]:{listen_port}" if ":" in listen_host else f"{listen_host}:{listen_port}"
    return f"""\
# The J-RAS coordinator's public listener (written by `jras deploy proxy-config`).
# Sites reach the SuperLink's Fleet API through it; the Control API (`flwr` commands:
# runs, SuperNode keys) and the Runtime API stay on loopback ({cfg.superlink}).
# Run: nginx -c THIS_FILE -p {state} -e stderr
daemon off;
worker_processes 1;
pid {state}/nginx.pid;
error_log stderr warn;

events {{
    worker_connections 512;
}}

http {{
    access_log {state}/access.log;
    client_body_temp_path {state}/client_body;
    proxy_temp_path {state}/proxy;
    fastcgi_temp_path {state}/fastcgi;
    uwsgi_temp_path {state}/uwsgi;
    scgi_temp_path {state}/scgi;
    server_tokens off;
    default_type application/octet-stream;

    upstream superlink {{
        server {cfg.superlink};
        keepalive 16;
    }}

    server {{
        listen {listen} ssl;
        ssl_certificate {cfg.server_cert};
        ssl_certificate_key {cfg.server_key};
        ssl_protocols TLSv1.2 TLSv1.3;
        client_max_body_size {cfg.max_body_mib}m;

        # the Fleet API, POST only: SuperNodes register, pull and push messages and objects
        location ~ {FLEET_LOCATION} {{
            limit_except POST {{ deny all; }}
            proxy_pass https://superlink;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_ssl_trusted_certificate {cfg.ca_cert};
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 2;
            proxy_ssl_name {UPSTREAM_NAME};
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_read_timeout {cfg.timeout_s}s;
            proxy_send_timeout {cfg.timeout_s}s;
        }}

        # everything else (the Control API, the Runtime API, docs) is refused
        location / {{
            return 403 "not served here\\n";
        }}
    }}
}}
"""


def write_nginx_conf(cfg: ProxyConfig, out: str | Path) -> Path:
    """Write :func:`render_nginx_conf` to ``out`` (and create the state folder); returns ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    out.write_text(render_nginx_conf(cfg))
    log.info("proxy configuration written to %s", out)
    return out


def nginx_binary() -> str:
    """The ``nginx`` executable (PATH, then ``/usr/sbin``)."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise ProxyError("nginx not found: install it (Debian: `apt-get install -y nginx`)")
    return found


def nginx_command(conf: str | Path, state_dir: str | Path) -> list[str]:
    """The command line that runs the proxy in the foreground (``daemon off``)."""
    return [nginx_binary(), "-c", str(Path(conf).resolve()), "-p", str(Path(state_dir).resolve()), "-e", "stderr"]


def check_nginx_conf(conf: str | Path, state_dir: str | Path) -> None:
    """``nginx -t`` on ``conf``; raises :class:`ProxyError` with nginx's output if it is not valid."""
    res = subprocess.run([*nginx_command(conf, state_dir), "-t"], capture_output=True, text=True, check=False,
                         timeout=60)
    if res.returncode != 0:
        raise ProxyError(f"{conf}: nginx -t failed:\n{res.stdout}{res.stderr}")


class NginxProxy(Started):
    """The proxy running on this machine (a context manager): writes the configuration into
    ``cfg.state_dir``, starts nginx in the foreground, waits for its port, and stops it (with
    its workers) by PID on close. Its output goes to ``state_dir/nginx.log``.

    Args:
        cfg: the proxy's settings.
        startup_timeout: seconds to wait for the public port.
    """

    def __init__(self, cfg: ProxyConfig, startup_timeout: float = 30.0):
        self.cfg = cfg
        self.startup_timeout = startup_timeout
        self.conf = cfg.state_dir / NGINX_CONF
        self.log_path = cfg.state_dir / "nginx.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        write_nginx_conf(self.cfg, self.conf)
        check_nginx_conf(self.conf, self.cfg.state_dir)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(nginx_command(self.conf, self.cfg.state_dir), stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        host, port = split_address(self.cfg.listen, "--listen")
        if host in ("0.0.0.0", "::"):  # noqa: S104 - a check of the address, not a bind
            host = "127.0.0.1"
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ProxyError(f"nginx exited with {self.proc.returncode}: "
                                 f"{self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                with socket.create_connection((host, port), timeout=0.5):
                    log.info("proxy listening on %s, forwarding the Fleet API to %s", self.cfg.listen, self.cfg.superlink)
                    return
            except OSError:
                time.sleep(0.1)
        raise ProxyError(f"nginx did not open {self.cfg.listen} within {self.startup_timeout:g} s")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def close(self) -> None:
        """Stop nginx (master and workers) by PID."""
        if self.proc is not None:
            stop_pid(self.proc.pid)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
