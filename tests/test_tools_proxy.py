"""The coordinator's proxy (tools.proxy, `jras deploy proxy-config`): its settings are checked
against the PKI files, and a real nginx in front of a stand-in HTTPS upstream forwards
``POST /v1/fleet/<endpoint>`` with the node-authentication headers and refuses everything else
(Control API, Runtime API, docs, other methods, path tricks) without reaching the upstream.
(The whole deployment through the proxy: ``test_deployment.py``.)"""

from __future__ import annotations

import http.client
import http.server
import os
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tools import pki
from tools.cli import main
from tools.processes import free_port
from tools.proxy import FLEET_LOCATION, NginxProxy, ProxyConfig, ProxyError, render_nginx_conf


@pytest.fixture
def coordinator_pki(tmp_path):
    pki.create_ca(tmp_path / "ca")
    pki.create_server_cert(tmp_path / "ca", tmp_path / "server", ["localhost", "127.0.0.1"])
    return tmp_path


def proxy_config(root: Path, listen: str = "127.0.0.1:8443", superlink: str = "127.0.0.1:9092",
                 server: str = "server") -> ProxyConfig:
    return ProxyConfig(listen=listen, superlink=superlink, ca_cert=root / "ca" / pki.CA_CERT,
                       server_cert=root / server / pki.SERVER_CERT, server_key=root / server / pki.SERVER_KEY,
                       state_dir=root / "proxy")


def test_settings_are_checked_against_the_pki(coordinator_pki):
    root = coordinator_pki
    conf = render_nginx_conf(proxy_config(root))
    assert FLEET_LOCATION in conf and "limit_except POST" in conf and "return 403" in conf
    assert "proxy_pass https://superlink;" in conf and "proxy_ssl_verify on;" in conf
    assert conf.count("proxy_pass") == 1  # one forwarded location, nothing else
    with pytest.raises(ProxyError, match="loopback"):
        proxy_config(root, superlink="10.0.0.5:9092")
    with pytest.raises(ProxyError, match="HOST:PORT"):
        proxy_config(root, listen="0.0.0.0")
    with pytest.raises(ProxyError, match="same port"):
        proxy_config(root, listen="0.0.0.0:9092")
    # a certificate without the loopback names: the proxy could not check the SuperLink
    pki.create_server_cert(root / "ca", root / "public-only", ["coordinator.example.org"])
    with pytest.raises(ProxyError, match="--host localhost --host 127.0.0.1"):
        proxy_config(root, server="public-only")
    # a certificate of another CA
    pki.create_ca(root / "other")
    pki.create_server_cert(root / "other", root / "foreign", ["localhost", "127.0.0.1"])
    with pytest.raises(ProxyError, match="not signed by"):
        proxy_config(root, server="foreign")


def test_cli_writes_a_config_nginx_accepts(coordinator_pki, capsys, nginx):
    root = coordinator_pki
    out = root / "etc" / "nginx.conf"
    assert main(["deploy", "proxy-config", "--ca", str(root / "ca"), "--server", str(root / "server"),
                 "--listen", "127.0.0.1:8443", "--superlink", "127.0.0.1:9092", "--state-dir", str(root / "state"),
                 "--out", str(out)]) == 0  # runs nginx -t
    assert "nginx -c" in capsys.readouterr().out and out.is_file() and (root / "state").is_dir()
    assert main(["deploy", "proxy-config", "--ca", str(root / "nowhere"), "--server", str(root / "server"),
                 "--out", str(out)]) == 2
    assert "ca.crt not found" in capsys.readouterr().err


class _Upstream(http.server.BaseHTTPRequestHandler):
    """Stands in for the SuperLink: records each request's method, path and headers."""

    seen: list[tuple[str, str, dict[str, str]]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.headers.get("Transfer-Encoding") == "chunked":
            body = b""
            while (size := int(self.rfile.readline().strip() or b"0", 16)) > 0:
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        self.seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        reply = b"upstream:" + str(len(body)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    do_GET = do_POST = do_PUT = _answer  # noqa: N815 - http.server's names

    def log_message(self, *args: object) -> None:
        pass


def test_proxy_forwards_only_the_fleet_api(coordinator_pki, nginx):
    root = coordinator_pki
    _Upstream.seen = []
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(root / "server" / pki.SERVER_CERT, root / "server" / pki.SERVER_KEY)
    upstream.socket = tls.wrap_socket(upstream.socket, server_side=True)
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    public = free_port()
    client_tls = ssl.create_default_context(cafile=str(root / "ca" / pki.CA_CERT))

    def request(method: str, path: str, body: bytes = b"x", headers: dict | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection("127.0.0.1", public, context=client_tls, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    try:
        with NginxProxy(proxy_config(root, listen=f"127.0.0.1:{public}",
                                     superlink=f"127.0.0.1:{upstream.server_address[1]}")):
            auth = {"flwr-public-key": "cGs=", "flwr-timestamp": "2026-01-01T00:00:00+00:00", "flwr-signature": "c2ln"}
            big = os.urandom(6 * 1024 * 1024)  # more than one object chunk
            assert request("POST", "/v1/fleet/pull-messages", headers=auth) == (200, b"upstream:1")
            assert request("POST", "/v1/fleet/push-object", body=big) == (200, f"upstream:{len(big)}".encode())
            refused = [
                ("POST", "/v1/control/list-runs"), ("POST", "/v1/control/register-node"),
                ("POST", "/v1/control/start-run"), ("POST", "/v1/runtime/pull-messages"),
                ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/health"),
                ("GET", "/v1/fleet/pull-messages"), ("PUT", "/v1/fleet/pull-messages"),
                ("POST", "/v1/fleet/../control/list-runs"), ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
                ("POST", "/v1/fleet/..%2fcontrol/list-runs"), ("POST", "/v1/fleet/pull-messages/../../control/stop-run"),
                ("POST", "/v1/fleet/pull-messages/extra"), ("POST", "/V1/FLEET/pull-messages"),
            ]
            for method, path in refused:
                status, _ = request(method, path)
                assert status == 403, (method, path, status)
    finally:
        upstream.shutdown()
        upstream.server_close()
    # only the two Fleet requests reached the upstream, with the node's signed headers intact
    assert [(m, p) for m, p, _ in _Upstream.seen] == [("POST", "/v1/fleet/pull-messages"),
                                                     ("POST", "/v1/fleet/push-object")]
    headers = _Upstream.seen[0][2]
    assert {k: headers.get(k) for k in auth} == auth


def test_deploy_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "tools.cli", "deploy", "--help"], check=False, capture_output=True,
                         text=True)
    assert out.returncode == 0 and "proxy-config" in out.stdout and "systemd" in out.stdout
