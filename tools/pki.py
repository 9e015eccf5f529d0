"""Keys and certificates for a TLS + node-authenticated deployment. No Flower import here.

* :func:`create_ca`: a self-signed certificate authority (``ca.key``, ``ca.crt``).
* :func:`create_server_cert`: the SuperLink's certificate, signed by the CA, with
  subject alternative names for the hosts sites dial (``server.key``, ``server.pem``).
* :func:`create_node_key`: a SuperNode's authentication key pair: OpenSSH ECDSA
  P-384 private key and ``.pub`` public key (the coordinator registers the ``.pub``
  with ``flwr supernode register``; the site keeps the private key).

Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
SERVER_KEY = "server.key"
SERVER_CERT = "server.pem"
DEFAULT_HOSTS = ("localhost", "127.0.0.1")


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(path, 0o600)
    else:
        path.write_bytes(data)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def create_ca(out_dir: str | Path, common_name: str = "J-RAS federation CA", days: int = 3650) -> tuple[Path, Path]:
    """Create a self-signed CA in ``out_dir``; returns ``(ca.key, ca.crt)``."""
    out = Path(out_dir)
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    key_path = _write(out / CA_KEY, _pem_key(key), private=True)
    cert_path = _write(out / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
    log.info("CA written to %s", cert_path)
    return key_path, cert_path


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def create_server_cert(
    ca_dir: str | Path, out_dir: str | Path, hosts: Sequence[str] = DEFAULT_HOSTS, days: int = 825
) -> tuple[Path, Path]:
    """Create the SuperLink's key and certificate, signed by the CA in ``ca_dir``.

    Args:
        ca_dir: folder with ``ca.key`` and ``ca.crt`` (from :func:`create_ca`).
        out_dir: where ``server.key`` and ``server.pem`` are written.
        hosts: DNS names and IP addresses sites use to reach the SuperLink (the SAN).

    Returns:
        ``(server.key, server.pem)``.
    """
    if not hosts:
        raise ValueError("create_server_cert needs at least one host name or address")
    ca_dir, out = Path(ca_dir), Path(out_dir)
    ca_key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    key_path = _write(out / SERVER_KEY, _pem_key(key), private=True)
    cert_path = _write(out / SERVER_CERT, cert.public_bytes(serialization.Encoding.PEM))
    log.info("server certificate for %s written to %s", list(hosts), cert_path)
    return key_path, cert_path


def create_node_key(out_path: str | Path, comment: str = "") -> tuple[Path, Path]:
    """Create a SuperNode authentication key pair: OpenSSH ECDSA P-384 private key at
    ``out_path`` and its public key at ``out_path.pub``; returns both paths."""
    out = Path(out_path)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if comment:
        public += b" " + comment.encode()
    key_path = _write(out, private, private=True)
    pub_path = _write(out.with_name(out.name + ".pub"), public + b"\n")
    log.info("node key written to %s", key_path)
    return key_path, pub_path
