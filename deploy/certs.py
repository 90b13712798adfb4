"""Certificates for a federation (a CA, the coordinator's TLS certificate, hospitals' client
certificates) and node keys.

Flower's documentation generates these with an openssl shell script; hospital administrators on
Windows or locked-down hosts often lack openssl, and wrong SAN entries are the most common cause of
"certificate verify failed" (e.g. Fed-BioMed #1447). So this module builds them with the
``cryptography`` package and always puts into the coordinator's certificate the names Flower itself
connects to: ``localhost``/``127.0.0.1`` (the SuperLink's own SuperExec reaches its Runtime API on
the loopback address when the SuperLink listens on 0.0.0.0) plus every name and IP the hospitals use.

Node authentication keys are EC P-384 key pairs in OpenSSH format, which is what
``flower-supernode --auth-supernode-private-key`` loads and ``flwr supernode register`` accepts.

Hospitals also hold a TLS client certificate that the coordinator's reverse proxy requires before
it forwards anything (deploy/README.md, "Network separation"): the hospital creates the key and a
certificate signing request (CSR) next to its node key, the administrator signs the CSR with the
federation CA (:func:`sign_client_csr`), so no private key ever leaves the machine it was made on,
and signing the same CSR again renews the certificate. Flower's SuperNode cannot present a client
certificate, so the hospital's proxy sidecar does; the SuperNode reaches that sidecar over TLS on
the loopback interface, with a throwaway certificate from :func:`make_loopback_certs`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
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
    """A hospital's files: node key pair (Flower) and TLS client key with its signing request."""

    private_key: Path
    public_key: Path
    tls_key: Path
    csr: Path


@dataclass(frozen=True)
class LoopbackCerts:
    """The hospital sidecar's TLS files on 127.0.0.1 (the CA's key is never written)."""

    ca_cert: Path
    cert: Path
    key: Path


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
    """A self-signed CA that signs end-entity certificates only (path length 0): the coordinator's
    server certificate and the hospitals' client certificates."""
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


def load_ca(ca_dir: str | Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The federation CA kept in ``ca_dir`` (``ca.crt`` and ``ca.key``); errors name the file."""
    out = Path(ca_dir)
    ca_crt, ca_key_path = out / "ca.crt", out / "ca.key"
    if not ca_crt.is_file() or not ca_key_path.is_file():
        missing = ca_key_path if ca_crt.is_file() else ca_crt
        raise ValueError(
            f"{missing} not found: the CA's certificate and key (`medflower deploy certs --out {out} --name ...` "
            "creates them; put ca.key back from its offline copy to sign)"
        )
    ca_cert = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca_key_path}: not an EC private key")
    if ca_cert.not_valid_after_utc <= _now():
        raise ValueError(
            f"{ca_crt}: the CA expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}; "
            f"move {ca_crt} and {ca_key_path} away to create a new CA"
        )
    return loaded, ca_cert


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
        ca_key, ca_cert = load_ca(out)
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
    """Write the hospital's keys: ``<site>.key`` (OpenSSH EC P-384 node key, 0600) and ``<site>.pub``
    for Flower's node authentication, ``<site>.tls.key`` (0600) and ``<site>.csr`` for the TLS
    client certificate the administrator signs.

    Refuses to replace an existing key: the coordinator knows the old public key, so a silent
    replacement would lock the site out until the administrator registers the new one.
    """
    check_site_name(site)
    out = Path(out_dir)
    priv, pub = out / f"{site}.key", out / f"{site}.pub"
    tls_key, csr = out / f"{site}.tls.key", out / f"{site}.csr"
    existing = [p for p in (priv, tls_key) if p.exists()]
    if existing and not overwrite:
        raise ValueError(
            f"{existing[0]} already exists; keep it (its .pub is what the coordinator registered, its "
            ".csr what the administrator signed) or pass --overwrite, then register the new .pub and "
            "have the new .csr signed"
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
    client_key = ec.generate_private_key(ec.SECP384R1())
    _write_private(tls_key, _pem_key(client_key))
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site)]))
        .sign(client_key, hashes.SHA384())
    )
    _write_public(csr, request.public_bytes(serialization.Encoding.PEM))
    return NodeKey(priv, pub, tls_key, csr)


def read_csr_site(csr_path: str | Path) -> tuple[x509.CertificateSigningRequest, str]:
    """A hospital's certificate signing request and the site name it asks for (its common name)."""
    p = Path(csr_path)
    if not p.is_file():
        raise ValueError(
            f"--client-csr {p}: file not found (the hospital's <site>.csr from `medflower deploy node-key`)"
        )
    try:
        request = x509.load_pem_x509_csr(p.read_bytes())
    except ValueError as err:
        raise ValueError(f"--client-csr {p}: not a PEM certificate signing request ({err})") from err
    if not request.is_signature_valid:
        raise ValueError(f"--client-csr {p}: its signature does not verify (damaged or edited)")
    cns = request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise ValueError(f"--client-csr {p}: expected exactly one common name (the site name)")
    try:
        site = check_site_name(str(cns[0].value))
    except ValueError as err:
        raise ValueError(f"--client-csr {p}: {err}") from err
    return request, site


def sign_client_csr(
    ca_dir: str | Path,
    csr_path: str | Path,
    *,
    days: int = 365,
    not_before: dt.datetime | None = None,
) -> Path:
    """Sign a hospital's CSR with the federation CA: ``<ca_dir>/clients/<site>.crt``; returns its path.

    The certificate is for TLS client authentication only (the coordinator's proxy checks it), valid
    for ``days`` but never beyond the CA. Signing the same CSR again renews it: same key, new
    validity, so the hospital only swaps the .crt. ``not_before`` exists for tests (an expired
    certificate); it defaults to now.
    """
    if days < 1:
        raise ValueError(f"--days must be >= 1, got {days}")
    ca_key, ca_cert = load_ca(ca_dir)
    request, site = read_csr_site(csr_path)
    public = request.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise ValueError(f"--client-csr {csr_path}: expected an EC key, got {type(public).__name__}")
    start = not_before or _now() - dt.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(min(start + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    path = Path(ca_dir) / "clients" / f"{site}.crt"
    _write_public(path, cert.public_bytes(serialization.Encoding.PEM))
    return path


def make_loopback_certs(out_dir: str | Path) -> LoopbackCerts:
    """A one-off CA and a certificate for ``127.0.0.1``/``localhost``, for the hospital's sidecar.

    ``flower-supernode`` refuses node authentication without TLS, and the sidecar is what it talks
    to. Made afresh at every start; the CA's key is dropped once it has signed, so it can sign
    nothing else.
    """
    out = Path(out_dir)
    ca_key, ca_cert = make_ca(common_name="medflower hospital sidecar (loopback only)", days=3650)
    key, cert = make_server_cert(ca_key=ca_key, ca_cert=ca_cert, dns_names=[], ip_addresses=[], days=3650)
    _write_public(out / "loopback-ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(out / "loopback.key", _pem_key(key))
    _write_public(out / "loopback.crt", cert.public_bytes(serialization.Encoding.PEM))
    return LoopbackCerts(out / "loopback-ca.crt", out / "loopback.crt", out / "loopback.key")


def key_sha256(public_key: str | Path) -> str:
    """The sha256 (hex) of an OpenSSH public key's base64 field: a key file's path or its text.

    The same fingerprint ``medflower node check`` prints (its first 16 digits) and the site
    directory stores, so a hospital and the administrator can compare them.
    """
    text = Path(public_key).read_text(encoding="utf-8") if isinstance(public_key, Path) else public_key
    fields = text.split()
    if len(fields) < 2:
        raise ValueError(f"{public_key}: not an OpenSSH public key line ('<type> <base64> [comment]')")
    return hashlib.sha256(fields[1].encode()).hexdigest()


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
