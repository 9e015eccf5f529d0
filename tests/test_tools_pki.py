"""Tests of tools.pki: the deployment's CA, server certificate and node keys."""

from __future__ import annotations

import pytest


def test_pki(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        load_ssh_private_key,
        load_ssh_public_key,
    )

    from tools import pki

    _, ca_crt = pki.create_ca(tmp_path / "ca")
    key, crt = pki.create_server_cert(tmp_path / "ca", tmp_path / "server", ["localhost", "127.0.0.1", "link.example"])
    ca = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "link.example"}
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert (key.stat().st_mode & 0o777) == 0o600
    priv_path, pub_path = pki.create_node_key(tmp_path / "nodes" / "site-a.key")
    priv = load_ssh_private_key(priv_path.read_bytes(), None)
    pub = load_ssh_public_key(pub_path.read_bytes())
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and isinstance(priv.curve, ec.SECP384R1)
    assert priv.public_key().public_numbers() == pub.public_numbers()
    assert pub_path.read_text().startswith("ecdsa-sha2-nistp384 ")
    with pytest.raises(ValueError):
        pki.create_server_cert(tmp_path / "ca", tmp_path / "s2", [])
