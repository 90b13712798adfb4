"""``medflower node check``: a hospital checks its setup before the first run.

A SuperNode that cannot connect retries silently, and a TLS failure surfaces as a generic gRPC/HTTP
error deep in a log (Flower #4844, Fed-BioMed #1447). This check does each step on its own and says
which one fails and what to do: the node key loads the way flower-supernode loads it, the CA
certificate is a valid, unexpired CA, the coordinator answers over TLS with a certificate that this
CA signed and that names the address dialled, its proxy accepts this hospital's client certificate
(``--client-cert``/``--client-key``: it answers ``/health`` from the SuperLink behind it), and the
site's data description is readable. It changes nothing (in particular it does not register or
activate the node).
"""

from __future__ import annotations

import datetime as dt
import http.client
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from flwr.common.config import parse_config_args

from medflower.client.site import load_site_config
from medflower.data.base import DataError
from medflower.data.manifest import read_rows
from medflower.deploy.certs import describe_cert, key_sha256, load_node_private_key, public_key_line
from medflower.deploy.proxy import CERT_REFUSED

EXPIRY_WARN_DAYS = 30


Status = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    detail: str


def _days_left(not_after: dt.datetime) -> float:
    return (not_after - dt.datetime.now(dt.UTC)).total_seconds() / 86400


def check_key(key_path: str | Path, pub_path: str | Path | None = None) -> CheckResult:
    try:
        key = load_node_private_key(key_path)
    except ValueError as err:
        return CheckResult("node key", "fail", str(err))
    line = public_key_line(key)
    fp = key_sha256(line)[:16]
    if pub_path is not None:
        pub = Path(pub_path)
        if not pub.is_file() or pub.read_text().split()[:2] != line.split()[:2]:
            return CheckResult("node key", "fail", f"{key_path} does not match public key {pub}")
    mode = os.stat(key_path).st_mode & 0o077
    if mode:
        return CheckResult("node key", "warn", f"{key_path} (key sha256 {fp}) is readable by other users; chmod 600 it")
    return CheckResult(
        "node key",
        "ok",
        f"{key_path} loads (EC {key.curve.name}, key sha256 {fp}); whether the administrator registered "
        "its .pub cannot be checked from here (Flower's Fleet API answers only by activating the node): "
        "`medflower deploy sites` on the coordinator shows the same 16 digits, and a refused key shows "
        "at the node's first start",
    )


def check_ca(ca_path: str | Path) -> CheckResult:
    p = Path(ca_path)
    if not p.is_file():
        return CheckResult("CA certificate", "fail", f"{p} not found (get ca.crt from the administrator)")
    try:
        cert = x509.load_pem_x509_certificate(p.read_bytes())
    except ValueError as err:
        return CheckResult("CA certificate", "fail", f"{p}: not a PEM certificate ({err})")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        return CheckResult(
            "CA certificate", "fail", f"{p} is not a CA certificate (did you get coordinator.crt instead of ca.crt?)"
        )
    days = _days_left(cert.not_valid_after_utc)
    if days <= 0:
        return CheckResult("CA certificate", "fail", f"{p} expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    status: Status = "warn" if days < EXPIRY_WARN_DAYS else "ok"
    return CheckResult(
        "CA certificate", status, f"{p} valid until {cert.not_valid_after_utc:%Y-%m-%d} ({days:.0f} days)"
    )


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"coordinator address {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def _served_cert(host: str, port: int, timeout: float) -> x509.Certificate | None:
    """The coordinator's certificate without verifying it, to explain a verification failure."""
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with (
            socket.create_connection((host, port), timeout=timeout) as sock,
            ctx.wrap_socket(sock, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der) if der else None
    except (OSError, ValueError):
        return None


def check_coordinator(
    address: str,
    ca_path: str | Path,
    *,
    timeout: float = 5.0,
    client_cert: str | Path | None = None,
    client_key: str | Path | None = None,
) -> CheckResult:
    """TLS to the coordinator, verified against ``ca_path``; with a client certificate, the proxy's verdict."""
    name = "coordinator"
    if (client_cert is None) != (client_key is None):
        return CheckResult(name, "fail", "give --client-cert and --client-key together")
    try:
        host, port = split_address(address)
    except ValueError as err:
        return CheckResult(name, "fail", str(err))
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as err:
        return CheckResult(name, "fail", f"cannot resolve {host!r} ({err}); check the name or use the coordinator's IP")
    except ConnectionRefusedError:
        return CheckResult(
            name,
            "fail",
            f"{host}:{port} refused the connection: the coordinator is not running or listens on another port",
        )
    except OSError as err:
        return CheckResult(
            name,
            "fail",
            f"no connection to {host}:{port} within {timeout:.0f}s ({err}); "
            "a firewall or route blocks outbound traffic to the coordinator",
        )
    ctx = ssl.create_default_context(cafile=str(ca_path))
    if client_cert is not None and client_key is not None:
        try:
            ctx.load_cert_chain(str(client_cert), str(client_key))
        except (ssl.SSLError, OSError) as err:
            sock.close()
            return CheckResult(
                name, "fail", f"--client-cert {client_cert} / --client-key {client_key} do not load as a pair ({err})"
            )
    try:
        with ctx.wrap_socket(sock, server_hostname=host) as tls:
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as err:
        served = _served_cert(host, port, timeout)
        extra = ""
        if served is not None:
            d = describe_cert(served)
            extra = (
                f"; the coordinator's certificate names {d['dns'] + d['ips']} and is valid "
                f"{d['not_before']:%Y-%m-%d} to {d['not_after']:%Y-%m-%d}"
            )
        hint = (
            "ask the administrator to re-issue it with `medflower deploy certs --name/--ip` for the address you dial"
            if "mismatch" in str(err.verify_message).lower() or "ip address" in str(err.verify_message).lower()
            else "check that --ca is the federation's ca.crt and the certificate has not expired"
        )
        return CheckResult(
            name, "fail", f"TLS verification of {host}:{port} failed: {err.verify_message}{extra}; {hint}"
        )
    except (ssl.SSLError, OSError) as err:
        sock.close()
        return CheckResult(
            name, "fail", f"TLS handshake with {host}:{port} failed ({err}); is this the coordinator's HTTPS port?"
        )
    if der is None:
        return CheckResult(name, "fail", f"{host}:{port} sent no certificate")
    cert = x509.load_der_x509_certificate(der)
    days = _days_left(cert.not_valid_after_utc)
    health, body = _health(host, port, ctx, timeout)
    reached = (
        f"{host}:{port} reachable over TLS; certificate verified, valid until "
        f"{cert.not_valid_after_utc:%Y-%m-%d} ({days:.0f} days)"
    )
    if CERT_REFUSED in body:
        hint = (
            "pass --client-cert and --client-key (the certificate the administrator signed for your .csr)"
            if client_cert is None
            else f"the proxy refused --client-cert {client_cert} ({body.strip()}); it must be issued by the "
            "federation CA and be within its validity: ask the administrator to sign your .csr again"
        )
        return CheckResult(name, "fail", f"{reached}; but its proxy requires a client certificate: {hint}")
    status: Status = "warn" if days < EXPIRY_WARN_DAYS or health != 200 else "ok"
    accepted = "; client certificate accepted" if client_cert is not None and health == 200 else ""
    return CheckResult(name, status, f"{reached}{accepted}; /health answered {health}")


def _health(host: str, port: int, ctx: ssl.SSLContext, timeout: float) -> tuple[int | str, str]:
    try:
        conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=timeout)
        conn.request("GET", "/health")
        resp = conn.getresponse()
        body = resp.read(4096).decode(errors="replace")
        conn.close()
        return resp.status, body
    except (OSError, http.client.HTTPException) as err:
        return f"error ({err})", ""


def parse_node_config(text: str) -> dict[str, object]:
    return dict(parse_config_args([text]))


def check_data(node_config: str) -> CheckResult:
    name = "site data"
    try:
        cfg = parse_node_config(node_config)
    except Exception as err:
        return CheckResult(name, "fail", f"--node-config {node_config!r} does not parse: {err}")
    if "site-config" in cfg:
        return _check_site_yaml(Path(str(cfg["site-config"])))
    if "partition-id" in cfg:
        pid, n = cfg.get("partition-id"), cfg.get("num-partitions")
        if not isinstance(pid, int) or not isinstance(n, int) or not 0 <= pid < n:
            return CheckResult(
                name, "fail", f"partition-id={pid!r} num-partitions={n!r}: need integers with 0 <= id < n"
            )
        return CheckResult(name, "ok", f"simulated partition {pid} of {n} (rehearsal data, generated by the ClientApp)")
    return CheckResult(name, "fail", "node config has neither site-config (the hospital's site YAML) nor partition-id")


def _readable(p: Path) -> bool:
    return p.exists() and os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0))


def _check_site_yaml(path: Path) -> CheckResult:
    """Validate the site YAML and list its images (without decoding them: that is `medflower site check`)."""
    name = "site data"
    try:
        site = load_site_config(path)
        rows = read_rows(site.data, site.data_path(), site.task).rows
    except (ValueError, DataError, OSError) as err:  # ConfigError is a ValueError
        return CheckResult(name, "fail", str(err))
    bad = [r.where for r in rows if not _readable(r.image) or (isinstance(r.label, Path) and not _readable(r.label))]
    if bad:
        return CheckResult(
            name,
            "fail",
            f"{path}: {len(bad)} of {len(rows)} listed file(s) missing or unreadable, e.g. {', '.join(bad[:3])}",
        )
    return CheckResult(
        name,
        "ok",
        f"{path}: site {site.name!r}, {len(rows)} image(s) listed, all readable "
        f"(to decode every file: medflower site check {path})",
    )


def run_checks(
    *,
    coordinator: str,
    ca: str | Path,
    key: str | Path,
    node_config: str,
    pub: str | Path | None = None,
    client_cert: str | Path | None = None,
    client_key: str | Path | None = None,
    timeout: float = 5.0,
) -> list[CheckResult]:
    return [
        check_key(key, pub),
        check_ca(ca),
        check_coordinator(coordinator, ca, timeout=timeout, client_cert=client_cert, client_key=client_key),
        check_data(node_config),
    ]


def report(results: list[CheckResult]) -> int:
    """Print one line per check; exit status 1 if any failed."""
    for r in results:
        print(f"{r.status.upper():4} {r.name}: {r.detail}", flush=True)
    failed = [r.name for r in results if r.status == "fail"]
    print("node check: " + (f"FAILED ({', '.join(failed)})" if failed else "all checks passed"), flush=True)
    return 1 if failed else 0
