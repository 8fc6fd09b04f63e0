"""A throw-away PKI for tests: one self-signed CA and leaf server certificates.

The certificates satisfy OpenSSL 3 ``-x509_strict`` and Python's
``ssl.VERIFY_X509_STRICT`` (the default from Python 3.13): the CA carries a
critical BasicConstraints CA=true, KeyUsage keyCertSign/cRLSign, SKI and AKI;
leaves carry SAN, EKU serverAuth, KeyUsage, SKI and AKI.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_COMMON_NAME = "egress-gateway test CA"


@dataclass(frozen=True)
class CertPaths:
    """PEM files of one certificate.

    ``cert``: the certificate; ``key``: its private key (PKCS#8, unencrypted);
    ``chain``: for leaves, leaf + CA certificate in one file (None for the CA).
    """

    cert: Path
    key: Path
    chain: Path | None = None


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_certs(path: Path, *certs: x509.Certificate) -> None:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def _load_key(path: Path):
    return serialization.load_pem_private_key(Path(path).read_bytes(), password=None)


def make_test_ca(directory: str | os.PathLike[str]) -> CertPaths:
    """Create a self-signed EC P-256 CA in ``directory`` (ca.pem, ca-key.pem)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "egress-gateway tests"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(days=1))
        .not_valid_after(now + _dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    paths = CertPaths(cert=d / "ca.pem", key=d / "ca-key.pem")
    _write_key(paths.key, key)
    _write_certs(paths.cert, cert)
    return paths


def issue_server_cert(
    ca: CertPaths,
    directory: str | os.PathLike[str],
    names: list[str],
    ips: list[str],
    *,
    stem: str = "server",
) -> CertPaths:
    """Issue a server leaf signed by ``ca`` with the given SAN DNS names and IPs.

    Writes ``<stem>.pem`` (leaf), ``<stem>-key.pem`` and ``<stem>-chain.pem``
    (leaf + CA) into ``directory``. Valid from now-1 day to now+30 days.
    """
    if not names and not ips:
        raise ValueError("a server certificate needs at least one name or IP")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca_cert = _load_cert(ca.cert)
    ca_key = _load_key(ca.key)
    key = ec.generate_private_key(ec.SECP256R1())

    cn = names[0] if names else ips[0]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    san += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(days=1))
        .not_valid_after(now + _dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = CertPaths(
        cert=d / f"{stem}.pem", key=d / f"{stem}-key.pem", chain=d / f"{stem}-chain.pem"
    )
    _write_key(paths.key, key)
    _write_certs(paths.cert, cert)
    _write_certs(paths.chain, cert, ca_cert)
    return paths
