"""Federation certificates, node keys, the flwr connection entry and ``medflower node check``.

The coordinator is stood in for by a small HTTPS server on 127.0.0.1 using the generated
certificate, so the TLS checks run the real handshake and verification (loopback only).
"""

from __future__ import annotations

import datetime as dt
import http.server
import os
import socket
import ssl
import threading
from pathlib import Path

import pytest
import tomli
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from medflower.cli import main as cli
from medflower.deploy import certs, nodecheck


@pytest.fixture
def fed(tmp_path: Path) -> certs.FederationCerts:
    return certs.make_federation_certs(tmp_path / "certs", names=["coordinator.example.org"], ips=["10.0.0.5"])


def _san(path: Path) -> tuple[list[str], list[str]]:
    d = certs.describe_cert(x509.load_pem_x509_certificate(path.read_bytes()))
    return d["dns"], d["ips"]


def test_coordinator_certificate_names_every_address_and_chains_to_the_ca(fed) -> None:
    dns, ips = _san(fed.coordinator_cert)
    assert dns == ["coordinator.example.org", "localhost"] and ips == ["10.0.0.5", "127.0.0.1"]
    ca = x509.load_pem_x509_certificate(fed.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(fed.coordinator_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert fed.ca_key.stat().st_mode & 0o777 == 0o600 and fed.coordinator_key.stat().st_mode & 0o777 == 0o600


def test_reissuing_keeps_the_ca_so_hospitals_keep_their_ca_crt(fed, tmp_path: Path) -> None:
    ca_before = fed.ca_cert.read_bytes()
    again = certs.make_federation_certs(tmp_path / "certs", names=["new-name"], ips=[])
    assert again.reused_ca and again.ca_cert.read_bytes() == ca_before
    assert _san(again.coordinator_cert)[0] == ["new-name", "localhost"]
    fed.ca_key.rename(tmp_path / "offline-ca.key")  # kept offline: no silent new CA
    with pytest.raises(ValueError, match="ca.key does not"):
        certs.make_federation_certs(tmp_path / "certs", names=["x"], ips=[])
    assert fed.ca_cert.read_bytes() == ca_before


def test_bad_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--ip 'coordinator'"):
        certs.make_federation_certs(tmp_path, names=[], ips=["coordinator"])
    with pytest.raises(ValueError, match="at least one --name or --ip"):
        certs.make_federation_certs(tmp_path, names=[], ips=[])
    with pytest.raises(ValueError, match="site name 'a/b'"):
        certs.make_node_key(tmp_path, site="a/b")


def test_node_key_is_what_flower_loads_and_registers(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    key = certs.make_node_key(tmp_path, site="hospital-a")
    priv = serialization.load_ssh_private_key(key.private_key.read_bytes(), password=None)  # flower-supernode's loader
    assert priv.curve.name == "secp384r1"
    assert key.private_key.stat().st_mode & 0o777 == 0o600
    assert try_load_public_key(key.public_key)  # `flwr supernode register`'s loader
    assert key.public_key.read_text().split()[:2] == certs.public_key_line(priv).split()
    with pytest.raises(ValueError, match="already exists"):
        certs.make_node_key(tmp_path, site="hospital-a")


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def serve(fed):
    """Start HTTPS servers on a loopback address presenting the coordinator's certificate."""
    servers = []

    def start(host: str = "127.0.0.1") -> int:
        srv = http.server.ThreadingHTTPServer((host, 0), _Health)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(fed.coordinator_cert, fed.coordinator_key)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv.server_address[1]

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def tls_server(serve) -> int:
    return serve("127.0.0.1")


def test_node_check_passes_against_the_coordinator(fed, tls_server, tmp_path: Path, capsys) -> None:
    key = certs.make_node_key(tmp_path / "site", site="hospital-a")
    rc = cli(
        [
            "node",
            "check",
            "--coordinator",
            f"127.0.0.1:{tls_server}",
            "--ca",
            str(fed.ca_cert),
            "--key",
            str(key.private_key),
            "--pub",
            str(key.public_key),
            "--node-config",
            "partition-id=0 num-partitions=3",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "all checks passed" in out and "/health answered 200" in out


def test_node_check_explains_a_name_missing_from_the_certificate(fed, serve) -> None:
    port = serve("127.0.0.2")  # a loopback address the certificate does not name
    res = nodecheck.check_coordinator(f"127.0.0.2:{port}", fed.ca_cert)
    assert res.status == "fail"
    assert "127.0.0.2" in res.detail and "coordinator.example.org" in res.detail and "--name/--ip" in res.detail


def test_node_check_rejects_a_coordinator_signed_by_another_ca(tls_server, tmp_path: Path) -> None:
    other = certs.make_federation_certs(tmp_path / "other", names=["x"], ips=[])
    res = nodecheck.check_coordinator(f"127.0.0.1:{tls_server}", other.ca_cert)
    assert res.status == "fail" and "TLS verification" in res.detail and "--ca" in res.detail


def test_node_check_reports_nothing_listening(fed) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    res = nodecheck.check_coordinator(f"127.0.0.1:{port}", fed.ca_cert)
    assert res.status == "fail" and "refused" in res.detail


def test_node_check_flags_an_expired_ca_and_a_wrong_file(tmp_path: Path, fed) -> None:
    key, ca = certs.make_ca(common_name="old", days=1)
    builder = x509.CertificateBuilder().subject_name(ca.subject).issuer_name(ca.subject).public_key(key.public_key())
    now = dt.datetime.now(dt.UTC)
    expired = (
        builder.serial_number(1)
        .not_valid_before(now - dt.timedelta(days=10))
        .not_valid_after(now - dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, certs.hashes.SHA384())
    )
    (tmp_path / "old.crt").write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    assert "expired" in nodecheck.check_ca(tmp_path / "old.crt").detail
    res = nodecheck.check_ca(fed.coordinator_cert)
    assert res.status == "fail" and "not a CA" in res.detail


def test_node_check_data_and_key_problems(tmp_path: Path) -> None:
    from PIL import Image

    assert nodecheck.check_data("partition-id=3 num-partitions=3").status == "fail"
    assert nodecheck.check_data("partition-id=1 num-partitions=3").status == "ok"
    site = tmp_path / "site.yaml"
    site.write_text("name: hospital-a\ntask: classification\ndata:\n  kind: folders\n  path: export\n")
    res = nodecheck.check_data(f"site-config='{site}'")
    assert res.status == "fail" and "export" in res.detail and "not found" in res.detail
    for cls in ("benign", "malignant"):
        (tmp_path / "export" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (8, 8), color=40 * i).save(tmp_path / "export" / cls / f"{i}.png")
    res = nodecheck.check_data(f"site-config='{site}'")
    assert res.status == "ok" and "'hospital-a', 4 image(s)" in res.detail, res.detail
    (tmp_path / "export" / "benign" / "1.png").chmod(0)
    if not os.access(tmp_path / "export" / "benign" / "1.png", os.R_OK):  # root reads anything
        res = nodecheck.check_data(f"site-config='{site}'")
        assert res.status == "fail" and "benign/1.png" in res.detail
    site.write_text("name: bad/name\ntask: classification\ndata: {kind: folders, path: export}\n")
    assert "not a valid public site name" in nodecheck.check_data(f"site-config='{site}'").detail
    assert nodecheck.check_key(tmp_path / "missing.key").status == "fail"
    a = certs.make_node_key(tmp_path, site="a")
    b = certs.make_node_key(tmp_path, site="b")
    assert "does not match" in nodecheck.check_key(a.private_key, b.public_key).detail


def test_connection_entry_is_added_without_touching_others(tmp_path: Path, monkeypatch, fed) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    assert (
        cli(
            [
                "deploy",
                "connection",
                "--name",
                "fed",
                "--address",
                "coordinator.example.org:9093",
                "--ca",
                str(fed.ca_cert),
            ]
        )
        == 0
    )
    data = tomli.loads((tmp_path / "home" / "config.toml").read_text())
    assert data["superlink"]["default"] == "fed"
    assert data["superlink"]["fed"] == {
        "address": "coordinator.example.org:9093",
        "root-certificates": str(fed.ca_cert.resolve()),
    }
    assert "local" in data["superlink"]  # Flower's own entry is kept
    assert cli(["deploy", "connection", "--name", "fed", "--address", "nohostport", "--ca", str(fed.ca_cert)]) == 2


def test_cli_writes_certs_and_keys(tmp_path: Path, capsys) -> None:
    assert cli(["deploy", "certs", "--out", str(tmp_path / "c"), "--name", "coordinator", "--ip", "10.1.2.3"]) == 0
    assert cli(["deploy", "node-key", "--site", "hospital-b", "--out", str(tmp_path / "k")]) == 0
    out = capsys.readouterr().out
    assert "created CA" in out and "['coordinator', 'localhost', '10.1.2.3', '127.0.0.1']" in out
    assert (tmp_path / "k" / "hospital-b.pub").is_file()


def test_a_hospitals_csr_becomes_a_client_certificate_and_renews_with_the_same_key(fed, tmp_path: Path) -> None:
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = certs.make_node_key(tmp_path / "site", site="hospital-a")
    assert key.tls_key.stat().st_mode & 0o777 == 0o600
    first = certs.sign_client_csr(fed.ca_cert.parent, key.csr, days=30)
    assert first == fed.ca_cert.parent / "clients" / "hospital-a.crt"
    cert = x509.load_pem_x509_certificate(first.read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(fed.ca_cert.read_bytes()))
    assert cert.subject.rfc4514_string() == "CN=hospital-a"
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]  # a client certificate, never a server's
    assert 29 < (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 30
    tls_key = serialization.load_pem_private_key(key.tls_key.read_bytes(), password=None)
    spki = (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert cert.public_key().public_bytes(*spki) == tls_key.public_key().public_bytes(*spki)
    renewed = x509.load_pem_x509_certificate(certs.sign_client_csr(fed.ca_cert.parent, key.csr).read_bytes())
    assert renewed.serial_number != cert.serial_number  # a new certificate ...
    assert renewed.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)  # ... for the same key


def test_client_csr_errors_name_the_file(fed, tmp_path: Path) -> None:
    key = certs.make_node_key(tmp_path / "site", site="hospital-a")
    with pytest.raises(ValueError, match="--client-csr .*nowhere.csr: file not found"):
        certs.sign_client_csr(fed.ca_cert.parent, tmp_path / "nowhere.csr")
    (tmp_path / "bad.csr").write_text("not a csr")
    with pytest.raises(ValueError, match="--client-csr .*bad.csr: not a PEM certificate signing request"):
        certs.sign_client_csr(fed.ca_cert.parent, tmp_path / "bad.csr")
    with pytest.raises(ValueError, match="ca.crt not found: the CA.s certificate and key"):
        certs.sign_client_csr(tmp_path / "site", key.csr)  # no CA there
    with pytest.raises(ValueError, match="--days must be >= 1"):
        certs.sign_client_csr(fed.ca_cert.parent, key.csr, days=0)
    fed.ca_key.rename(tmp_path / "offline-ca.key")  # kept offline between signings
    with pytest.raises(ValueError, match="ca.key not found: .*put ca.key back from its offline copy"):
        certs.sign_client_csr(fed.ca_cert.parent, key.csr)
    (tmp_path / "offline-ca.key").rename(fed.ca_key)
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    odd = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "../etc")]))
        .sign(ec.generate_private_key(ec.SECP384R1()), certs.hashes.SHA384())
    )
    (tmp_path / "odd.csr").write_bytes(odd.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ValueError, match="--client-csr .*odd.csr: site name '../etc'"):
        certs.sign_client_csr(fed.ca_cert.parent, tmp_path / "odd.csr")


def test_cli_signs_a_csr_without_touching_the_coordinator_certificate(fed, tmp_path: Path, capsys) -> None:
    key = certs.make_node_key(tmp_path / "site", site="hospital-b")
    before = fed.coordinator_cert.read_bytes()
    assert cli(["deploy", "certs", "--out", str(fed.ca_cert.parent), "--client-csr", str(key.csr), "--days", "90"]) == 0
    out = capsys.readouterr().out
    assert "client certificate:" in out and "CN=hospital-b" in out and "coordinator certificate" not in out
    assert fed.coordinator_cert.read_bytes() == before
    assert cli(["deploy", "certs", "--out", str(tmp_path / "empty"), "--client-csr", str(key.csr)]) == 2


class _MutualTLS(http.server.BaseHTTPRequestHandler):
    """Answers /health like the coordinator's nginx: 400 and its refusal text without a client certificate."""

    def do_GET(self):
        from medflower.deploy.proxy import CERT_REFUSED

        ok = bool(self.connection.getpeercert())
        body = b"" if ok else f"{CERT_REFUSED} (NONE)\n".encode()
        self.send_response(200 if ok else 400)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_node_check_reports_the_proxys_verdict_on_the_client_certificate(fed, tmp_path: Path) -> None:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MutualTLS)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(fed.coordinator_cert, fed.coordinator_key)
    ctx.load_verify_locations(fed.ca_cert)
    ctx.verify_mode = ssl.CERT_OPTIONAL  # like nginx: the verdict comes as an HTTP answer
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{srv.server_address[1]}"
        res = nodecheck.check_coordinator(address, fed.ca_cert)
        assert res.status == "fail" and "pass --client-cert and --client-key" in res.detail, res.detail
        key = certs.make_node_key(tmp_path / "site", site="hospital-a")
        crt = certs.sign_client_csr(fed.ca_cert.parent, key.csr)
        res = nodecheck.check_coordinator(address, fed.ca_cert, client_cert=crt, client_key=key.tls_key)
        assert res.status == "ok" and "client certificate accepted" in res.detail, res.detail
        res = nodecheck.check_coordinator(address, fed.ca_cert, client_cert=crt, client_key=key.private_key)
        assert res.status == "fail" and "do not load as a pair" in res.detail, res.detail
    finally:
        srv.shutdown()
        srv.server_close()


def test_key_fingerprint_is_the_one_node_check_prints(tmp_path: Path, capsys) -> None:
    """One format on both sides: `node check`, `node fingerprint`, and the administrator's `deploy sites`."""
    from medflower.cli import main
    from medflower.deploy.sites import SiteStatus, format_sites
    from medflower.server.identity import RegisteredSite

    key = certs.make_node_key(tmp_path, site="hospital-a")
    fp = certs.key_sha256(key.public_key)
    assert len(fp) == 64 and fp == certs.key_sha256(key.public_key.read_text())
    detail = nodecheck.check_key(key.private_key, key.public_key).detail
    assert f"key sha256 {fp[:16]}" in detail and "cannot be checked from here" in detail
    for path in (key.private_key, key.public_key):
        assert main(["node", "fingerprint", "--key", str(path)]) == 0
        assert capsys.readouterr().out.strip() == fp[:16]
    table = format_sites([SiteStatus(RegisteredSite(5, "hospital-a", fp), "online")])
    assert table.splitlines()[0].split()[3:5] == ["key", "sha256"] and fp[:16] in table.splitlines()[1]
    with pytest.raises(ValueError, match="not an OpenSSH public key line"):
        certs.key_sha256("garbage")
