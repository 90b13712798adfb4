"""Certificates for a federation (a CA and the coordinator's TLS certificate) and node keys.

Flower's documentation generates these with an openssl shell script; hospital administrators on
Windows or locked-down hosts often lack openssl, and wrong SAN entries are the most common cause of
"certificate verify failed" (e.g. Fed-BioMed #1447). So this module builds them with the
``cryptography`` package and always puts into the coordinator's certificate the names Flower itself
connects to: ``localhost``/``127.0.0.1`` (the SuperLink's own SuperExec reaches its Runtime API on
the loopback address when the SuperLink listens on 0.0.0.0) plus every name and IP the hospitals use.

Node authentication keys are EC P-384 key pairs in OpenSSH format, which is what
``flower-supernode --auth-supernode-private-key`` loads and ``flwr supernode register`` accepts.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
ALWAYS_DNS = ("localhost",)
ALWAYS_IPS = ("127.0.0.1",)


@dataclass(frozen=True)
class FederationCerts:
    """Where :func:`make_federation_certs` wrote each file."""

    ca_cert: Path
    ca_key: Path
    coordinator_cert: Path
    coordinator_key: Path
    reused_ca: bool


@dataclass(frozen=True)
class NodeKey:
    private_key: Path
    public_key: Path


def _write_private(path: Path, data: bytes) -> None:
    """Private keys are created 0600 so other local users never see them, even briefly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(*, common_name: str, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that signs only the coordinator's certificate (path length 0)."""
    if days < 1:
        raise ValueError(f"ca_days must be >= 1, got {days}")
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medflower federation"),
        ]
    )
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
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _parse_ips(ips: list[str] | tuple[str, ...]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    out = []
    for ip in ips:
        try:
            out.append(ipaddress.ip_address(ip))
        except ValueError as err:
            raise ValueError(f"--ip {ip!r} is not an IPv4/IPv6 address (put host names in --name)") from err
    return out


def make_server_cert(
    *,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    dns_names: list[str],
    ip_addresses: list[str],
    days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The coordinator's TLS certificate; its SAN lists every name/IP a hospital may dial."""
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    dns = list(dict.fromkeys([*dns_names, *ALWAYS_DNS]))
    ips = _parse_ips(list(dict.fromkeys([*ip_addresses, *ALWAYS_IPS])))
    key = ec.generate_private_key(ec.SECP384R1())
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns] + [x509.IPAddress(i) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_federation_certs(
    out_dir: str | Path,
    *,
    names: list[str],
    ips: list[str],
    days: int = 365,
    ca_days: int = 1825,
) -> FederationCerts:
    """Write ``ca.crt``/``ca.key`` (kept if they exist) and ``coordinator.crt``/``coordinator.key``.

    An existing CA is reused so that re-issuing the coordinator's certificate (new address, expiry)
    does not force every hospital to install a new ``ca.crt``.
    """
    out = Path(out_dir)
    if not names and not ips:
        raise ValueError("give at least one --name or --ip: the address hospitals use to reach the coordinator")
    ca_crt, ca_key_path = out / "ca.crt", out / "ca.key"
    if ca_crt.is_file() != ca_key_path.is_file():
        have, lack = (ca_crt, ca_key_path) if ca_crt.is_file() else (ca_key_path, ca_crt)
        raise ValueError(
            f"{have} exists but {lack} does not: put the CA's other half back to re-issue the "
            f"coordinator's certificate, or move {have} away to start a new CA (every hospital "
            "then needs the new ca.crt)"
        )
    reused = ca_crt.is_file()
    if reused:
        ca_cert = x509.load_pem_x509_certificate(ca_crt.read_bytes())
        loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{ca_key_path}: not an EC private key")
        ca_key = loaded
        if ca_cert.not_valid_after_utc <= _now():
            raise ValueError(
                f"{ca_crt}: the CA expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}; "
                f"move {ca_crt} and {ca_key_path} away to create a new CA"
            )
    else:
        ca_key, ca_cert = make_ca(common_name="medflower federation CA", days=ca_days)
        _write_private(ca_key_path, _pem_key(ca_key))
        _write_public(ca_crt, ca_cert.public_bytes(serialization.Encoding.PEM))
    key, cert = make_server_cert(ca_key=ca_key, ca_cert=ca_cert, dns_names=names, ip_addresses=ips, days=days)
    _write_private(out / "coordinator.key", _pem_key(key))
    _write_public(out / "coordinator.crt", cert.public_bytes(serialization.Encoding.PEM))
    return FederationCerts(ca_crt, ca_key_path, out / "coordinator.crt", out / "coordinator.key", reused)


def check_site_name(site: str) -> str:
    if not SITE_NAME_RE.match(site):
        raise ValueError(
            f"site name {site!r}: use 1-63 letters, digits, '-', '_' or '.', starting "
            "with a letter or digit (it becomes a file name)"
        )
    return site


def make_node_key(out_dir: str | Path, *, site: str, overwrite: bool = False) -> NodeKey:
    """Write ``<site>.key`` (OpenSSH EC P-384 private key, 0600) and ``<site>.pub``.

    Refuses to replace an existing key: the coordinator knows the old public key, so a silent
    replacement would lock the site out until the administrator registers the new one.
    """
    check_site_name(site)
    out = Path(out_dir)
    priv, pub = out / f"{site}.key", out / f"{site}.pub"
    if priv.exists() and not overwrite:
        raise ValueError(
            f"{priv} already exists; keep it (its .pub is what the coordinator registered) "
            "or pass --overwrite and register the new .pub"
        )
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        priv,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    pub_line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_public(pub, pub_line + f" {site}\n".encode())
    return NodeKey(priv, pub)


def load_node_private_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """Load a node key the way flower-supernode does; errors say what is wrong with the file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"node key {p} not found (create it with `medflower deploy node-key`)")
    try:
        key = serialization.load_ssh_private_key(p.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise ValueError(f"node key {p}: not an unencrypted OpenSSH private key ({err})") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"node key {p}: Flower needs an EC (NIST curve) key, got {type(key).__name__}")
    return key


def public_key_line(key: ec.EllipticCurvePrivateKey) -> str:
    """The OpenSSH public key line (without comment) matching a private key."""
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


class CertInfo(TypedDict):
    subject: str
    dns: list[str]
    ips: list[str]
    not_before: dt.datetime
    not_after: dt.datetime


def describe_cert(cert: x509.Certificate) -> CertInfo:
    """Subject, SAN entries and validity of a certificate, for printing and checks."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(v) for v in san.get_values_for_type(x509.DNSName)]
        ips = [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names, ips = [], []
    return {
        "subject": cert.subject.rfc4514_string(),
        "dns": names,
        "ips": ips,
        "not_before": cert.not_valid_before_utc,
        "not_after": cert.not_valid_after_utc,
    }
