"""`jras pki`: the coordinator's CA and SuperLink certificate, a site's node key."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tools.cli import main


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_pki_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "tools.cli", "pki", "--help"], check=False, capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("ca", "server-cert", "node-key"):
        assert cmd in out.stdout


def test_ca_and_server_cert(tmp_path, capsys):
    ca_dir, srv_dir = tmp_path / "ca", tmp_path / "server"
    assert main(["pki", "ca", "--out", str(ca_dir)]) == 0
    assert main(["pki", "server-cert", "--ca", str(ca_dir), "--out", str(srv_dir),
                 "--host", "localhost", "--host", "10.0.0.5"]) == 0
    printed = capsys.readouterr().out
    assert "ca.crt" in printed and "server.pem" in printed

    for f in (ca_dir / "ca.key", ca_dir / "ca.crt", srv_dir / "server.key", srv_dir / "server.pem"):
        assert f.is_file()
    assert mode(ca_dir / "ca.key") == 0o600 and mode(srv_dir / "server.key") == 0o600

    ca = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((srv_dir / "server.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    key = serialization.load_pem_private_key((srv_dir / "server.key").read_bytes(), password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_server_cert_default_hosts_and_missing_ca(tmp_path, capsys):
    assert main(["pki", "server-cert", "--ca", str(tmp_path / "nowhere"), "--out", str(tmp_path / "s")]) == 2
    assert "jras pki ca" in capsys.readouterr().err
    main(["pki", "ca", "--out", str(tmp_path / "ca")])
    assert main(["pki", "server-cert", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "s")]) == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "s" / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_node_key(tmp_path):
    path = tmp_path / "keys" / "site-a.key"
    assert main(["pki", "node-key", "--out", str(path), "--comment", "site-a"]) == 0
    pub = path.with_name("site-a.key.pub")
    assert path.is_file() and pub.is_file()
    assert mode(path) == 0o600
    text = path.read_text()
    assert text.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    key = serialization.load_ssh_private_key(text.encode(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)
    line = pub.read_text().strip()
    assert line.startswith("ecdsa-sha2-nistp384 ") and line.endswith(" site-a")
    public = serialization.load_ssh_public_key(line.encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.public_numbers() == key.public_key().public_numbers()
