"""The reverse proxies around Flower: nginx in front of the coordinator, and a sidecar at each hospital.

Why they exist. Flower 1.42's SuperLink serves three APIs over HTTPS on one port: the Fleet API
(hospitals' SuperNodes), the Control API (``flwr run``/``ls``/``stop``, ``flwr supernode register``)
and the Runtime API (its own ServerApp). Open-source Flower has no account authentication on the
Control API, so anyone who can reach that port and holds ``ca.crt`` (every hospital does) can list,
submit and stop runs, and register a node key of their own. So the SuperLink listens on the loopback
interface only, and nginx (Debian's package) is the only thing that listens on the network:

* the **hospital listener** (the public port, 9093) requires a TLS client certificate issued by the
  federation CA (``ssl_verify_client on``, depth 1: signed by the CA itself) and forwards only the
  Fleet API paths a SuperNode calls (:data:`HOSPITAL_FLEET_PATHS`, exact paths, POST only); every
  other path is answered 403 by nginx and never reaches Flower;
* the **admin listener** (9094) forwards only the Control API, and only to the coordinator host's
  own loopback addresses and the admin networks named with ``--admin-network``; with none named it
  listens on the loopback interface alone;
* the Runtime API is not proxied at all: the ServerApp reaches the SuperLink on 127.0.0.1.

Why a sidecar at each hospital. ``flower-supernode`` cannot present a client certificate: its HTTP
client (``flwr.supercore.protobuf.client.ProtobufClient``) hands httpx only a CA to verify with, and
its ``--root-certificates`` help says "This is not a client certificate for mTLS". It also refuses
node authentication over plain HTTP. So a second nginx runs next to it and listens on 127.0.0.1
only, with TLS from a throwaway loopback CA (:func:`medflower.deploy.certs.make_loopback_certs`),
forwards only the Fleet paths, and presents the hospital's client certificate to the coordinator
(verifying the coordinator's certificate against ``ca.crt`` and the name dialled).

The paths are pinned here, read from Flower 1.42 itself (``flwr/superlink/routers/fleet/router.py``,
``flwr/supernode/fleet_http_client.py``, ``flwr/supercore/control/control_http_client.py``);
``tests/test_deploy_proxy.py`` compares them with the installed Flower, so an upgrade that moves or
adds one fails loudly instead of leaving hospitals refused (or the Control API exposed).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from medflower.deploy.certs import LoopbackCerts, make_loopback_certs

FLEET_PREFIX = "/v1/fleet/"
CONTROL_PREFIX = "/v1/control/"
RUNTIME_PREFIX = "/v1/runtime/"
HEALTH_PATH = "/health"

# Every route of Flower 1.42's Fleet router (flwr/superlink/routers/fleet/router.py).
FLEET_PATHS: tuple[str, ...] = tuple(
    FLEET_PREFIX + name
    for name in (
        "register-node",
        "activate-node",
        "deactivate-node",
        "unregister-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)
# What a SuperNode with a registered key calls. register-node/unregister-node are self-registration
# (a node without --auth-supernode-private-key); with node authentication on, only the
# administrator registers keys, through the Control API, so the proxy does not forward them.
SELF_REGISTRATION_PATHS: tuple[str, ...] = (FLEET_PREFIX + "register-node", FLEET_PREFIX + "unregister-node")
HOSPITAL_FLEET_PATHS: tuple[str, ...] = tuple(p for p in FLEET_PATHS if p not in SELF_REGISTRATION_PATHS)
# Control API calls the administrator's commands make (flwr run/ls/stop/log, flwr supernode ...);
# the admin listener forwards the whole prefix, these are pinned to catch a move.
ADMIN_CONTROL_PATHS: tuple[str, ...] = tuple(
    CONTROL_PREFIX + name
    for name in ("start-run", "list-runs", "stop-run", "stream-logs", "register-node", "unregister-node", "list-nodes")
)

MAX_BODY = "64m"  # Flower sends arrays in 5 MB chunks and a FAB of about 1 MB; nginx's default is 1m
CONF_FILE = "nginx.conf"
SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")
CERT_REFUSED = "medflower coordinator: a client certificate issued by the federation CA is required"


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def nginx(self) -> str:
        """``host:port`` as nginx's ``listen``/``server`` directives want it (IPv6 in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host_port(text: str, *, flag: str) -> HostPort:
    """``HOST:PORT`` (``[v6]:PORT`` too); a ValueError names ``flag``."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{flag} {text!r}: expected HOST:PORT")
    if any(c in host for c in " ;{}'\"\\"):
        raise ValueError(f"{flag} {text!r}: not a host name or address")
    return HostPort(host, int(port))


def parse_admin_networks(networks: list[str]) -> list[str]:
    """CIDR networks (``10.0.5.0/24``, a single address is a /32); a ValueError names ``--admin-network``."""
    out = []
    for net in networks:
        try:
            out.append(str(ipaddress.ip_network(net, strict=False)))
        except ValueError as err:
            raise ValueError(f"--admin-network {net!r}: not an IP network ({err})") from err
    return out


def _require(path: Path, flag: str, what: str) -> Path:
    if not path.is_file():
        raise ValueError(f"{flag} {path}: file not found ({what})")
    if "'" in str(path) or '"' in str(path) or ";" in str(path):
        raise ValueError(f"{flag} {path}: quotes and ';' are not allowed in the path (it goes into nginx.conf)")
    return path.resolve()


def _fleet_location(upstream: str, extra: str = "") -> str:
    names = "|".join(p.removeprefix(FLEET_PREFIX) for p in HOSPITAL_FLEET_PATHS)
    return f"""
        location ~ ^{FLEET_PREFIX}({names})$ {{
            limit_except POST {{ deny all; }}
            proxy_pass https://{upstream};{extra}
        }}"""


def _common_http(out: Path) -> str:
    tmp = out / "tmp"
    return f"""
worker_processes 1;
pid {out}/nginx.pid;
error_log {out}/error.log notice;
events {{ worker_connections 512; }}

http {{
    server_tokens off;
    log_format medflower '$time_iso8601 $remote_addr "$request" $status $body_bytes_sent '
                         'client="$ssl_client_s_dn" serial=$ssl_client_serial verify=$ssl_client_verify';
    access_log {out}/access.log medflower;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size {MAX_BODY};
    # stream bodies both ways: nothing of a model update is written to disk by the proxy
    proxy_request_buffering off;
    proxy_buffering off;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_connect_timeout 10s;
    proxy_send_timeout 300s;
    proxy_read_timeout 300s;
    proxy_ssl_verify on;
    proxy_ssl_verify_depth 2;
    proxy_ssl_session_reuse on;
"""


def coordinator_config(
    *,
    certs: Path,
    out: Path,
    listen: HostPort,
    admin_port: int,
    superlink: HostPort,
    admin_networks: list[str],
) -> str:
    """nginx.conf for the coordinator (see the module doc); ``certs`` holds ca.crt, coordinator.crt/.key."""
    ca = _require(certs / "ca.crt", "--certs", "the federation CA, from `medflower deploy certs`")
    crt = _require(certs / "coordinator.crt", "--certs", "the coordinator's certificate")
    key = _require(certs / "coordinator.key", "--certs", "the coordinator's key")
    admin_host = listen.host if admin_networks else "127.0.0.1"
    allow = "\n".join(f"        allow {net};" for net in ["127.0.0.0/8", "::1", *admin_networks])
    tls = f"""
        ssl_certificate {crt};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;"""
    return f"""# Written by `medflower deploy proxy-config coordinator` at every start of
# deploy/start-coordinator.sh: edits here are lost (medflower.deploy.proxy explains the design).
{_common_http(out)}
    proxy_ssl_trusted_certificate {ca};
    proxy_ssl_name localhost;  # the SuperLink presents coordinator.crt, which always names localhost

    upstream superlink {{
        server {superlink.nginx()};
        keepalive 16;
    }}

    # Hospitals: the Fleet API only, and only with a client certificate the federation CA issued.
    server {{
        listen {listen.nginx()} ssl;{tls}
        ssl_client_certificate {ca};
        ssl_verify_client on;
        ssl_verify_depth 1;
        # 400, not 403: a SuperNode gives up on a 400 and exits ("Failed to initialize the
        # connection"); on a 403 Flower 1.42 raises RunNotRunningException and the node hangs.
        error_page 495 496 = @certificate_refused;
        location @certificate_refused {{
            return 400 "{CERT_REFUSED} ($ssl_client_verify)\\n";
        }}{_fleet_location("superlink")}
        location = {HEALTH_PATH} {{
            limit_except GET {{ deny all; }}
            proxy_pass https://superlink;
        }}
        location / {{
            return 403 "medflower coordinator: hospitals reach only Flower's Fleet API here\\n";
        }}
    }}

    # Administrators: the Control API, from this host and the admin networks only.
    server {{
        listen {HostPort(admin_host, admin_port).nginx()} ssl;{tls}
{allow}
        deny all;
        location {CONTROL_PREFIX} {{
            limit_except POST {{ deny all; }}
            proxy_pass https://superlink;
            proxy_read_timeout 3600s;  # flwr log streams
        }}
        location = {HEALTH_PATH} {{
            limit_except GET {{ deny all; }}
            proxy_pass https://superlink;
        }}
        location / {{
            return 403 "medflower coordinator: only Flower's Control API is served here\\n";
        }}
    }}
}}
"""


def _check_client_cert(client_cert: Path, client_key: Path, ca: Path) -> None:
    """Fail at start, naming the file, rather than with a refused connection later."""
    cert = x509.load_pem_x509_certificate(client_cert.read_bytes())
    ca_cert = x509.load_pem_x509_certificate(ca.read_bytes())
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as err:
        why = str(err) or "its signature does not verify"
        raise ValueError(
            f"--client-cert {client_cert}: not issued by the federation CA in --ca {ca} ({why}); "
            "ask the administrator to sign your .csr (medflower deploy certs --client-csr)"
        ) from err
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise ValueError(
            f"--client-cert {client_cert}: valid only {cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d}; ask the administrator to renew it "
            "(medflower deploy certs --client-csr with your .csr)"
        )
    try:
        key = serialization.load_pem_private_key(client_key.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise ValueError(f"--client-key {client_key}: not an unencrypted PEM private key ({err})") from err
    pem = serialization.Encoding.PEM
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(pem, spki) != cert.public_key().public_bytes(pem, spki):
        raise ValueError(f"--client-key {client_key} does not belong to --client-cert {client_cert}")


def hospital_config(
    *,
    coordinator: HostPort,
    ca: Path,
    client_cert: Path,
    client_key: Path,
    out: Path,
    listen: HostPort,
    loopback: LoopbackCerts,
    tls_name: str,
) -> str:
    """nginx.conf for a hospital's sidecar (see the module doc); ``tls_name``: see :func:`write_hospital_proxy`."""
    ca = _require(ca, "--ca", "the federation's ca.crt, from the administrator")
    client_cert = _require(client_cert, "--client-cert", "this hospital's certificate, from the administrator")
    client_key = _require(client_key, "--client-key", "this hospital's <site>.tls.key")
    _check_client_cert(client_cert, client_key, ca)
    if not _is_loopback(listen.host):
        raise ValueError(f"--listen {listen.nginx()}: the sidecar listens on a loopback address only")
    upstream_tls = f"""
            proxy_ssl_certificate {client_cert};
            proxy_ssl_certificate_key {client_key};
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_name {tls_name};
            proxy_ssl_server_name on;"""
    return f"""# Written by `medflower deploy proxy-config hospital` at every start of deploy/start-hospital.sh:
# edits here are lost (medflower.deploy.proxy explains why this sidecar exists).
{_common_http(out)}
    upstream coordinator {{
        server {coordinator.nginx()};
        keepalive 4;
    }}

    # This machine's SuperNode only (loopback): the Fleet API, with this hospital's client certificate.
    server {{
        listen {listen.nginx()} ssl;
        ssl_certificate {loopback.cert.resolve()};
        ssl_certificate_key {loopback.key.resolve()};
        ssl_protocols TLSv1.2 TLSv1.3;{_fleet_location("coordinator", upstream_tls)}
        location / {{
            return 403 "medflower hospital sidecar: only Flower's Fleet API is forwarded to the coordinator\\n";
        }}
    }}
}}
"""


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _prepare(out: Path) -> Path:
    out = out.resolve()
    if any(c in str(out) for c in "'\";{} "):
        raise ValueError(f"--out {out}: quotes, spaces, braces and ';' are not allowed (it goes into nginx.conf)")
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (out / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    return out


def write_coordinator_proxy(
    *, certs: str | Path, out: str | Path, listen: str, admin_port: int, superlink: str, admin_networks: list[str]
) -> Path:
    """Write ``<out>/nginx.conf`` for the coordinator; returns its path."""
    if not 0 < admin_port < 65536:
        raise ValueError(f"--admin-port {admin_port}: not a TCP port")
    sl = parse_host_port(superlink, flag="--superlink")
    if not _is_loopback(sl.host):
        raise ValueError(f"--superlink {superlink}: the SuperLink must listen on a loopback address (127.0.0.1)")
    folder = _prepare(Path(out))
    text = coordinator_config(
        certs=Path(certs),
        out=folder,
        listen=parse_host_port(listen, flag="--listen"),
        admin_port=admin_port,
        superlink=sl,
        admin_networks=parse_admin_networks(admin_networks),
    )
    (folder / CONF_FILE).write_text(text, encoding="utf-8")
    return folder / CONF_FILE


def write_hospital_proxy(
    *,
    coordinator: str,
    ca: str | Path,
    client_cert: str | Path,
    client_key: str | Path,
    out: str | Path,
    listen: str,
    coordinator_name: str | None = None,
) -> tuple[Path, LoopbackCerts]:
    """Write ``<out>/nginx.conf`` and fresh loopback certificates for a hospital's sidecar.

    ``coordinator_name`` is the DNS name the coordinator's certificate must carry; it defaults to the
    host of ``coordinator``. nginx verifies an upstream certificate by DNS name only (an IP address
    never matches), so a hospital that dials an IP address names one of the certificate's DNS names.
    """
    folder = _prepare(Path(out))
    target = parse_host_port(coordinator, flag="--coordinator")
    local = parse_host_port(listen, flag="--listen")
    tls_name = coordinator_name or target.host
    if _is_ip(tls_name):
        raise ValueError(
            f"--coordinator {coordinator}: nginx checks the coordinator's certificate by DNS name only; "
            "also give --coordinator-name NAME, a DNS name in its certificate (`medflower deploy certs --name`)"
        )
    if not SAFE_NAME_RE.match(tls_name):
        raise ValueError(f"--coordinator-name {tls_name!r}: not a DNS name")
    loopback = make_loopback_certs(folder)
    text = hospital_config(
        coordinator=target,
        ca=Path(ca),
        client_cert=Path(client_cert),
        client_key=Path(client_key),
        out=folder,
        listen=local,
        loopback=loopback,
        tls_name=tls_name,
    )
    (folder / CONF_FILE).write_text(text, encoding="utf-8")
    return folder / CONF_FILE, loopback


def nginx_argv(conf: Path) -> list[str]:
    """How the launch scripts run nginx on a written config: in the foreground, logs beside it."""
    folder = conf.parent
    return ["nginx", "-p", str(folder), "-c", str(conf), "-e", str(folder / "error.log"), "-g", "daemon off;"]
