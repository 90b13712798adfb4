"""The reverse proxies: Flower's HTTP paths pinned, the nginx configs, and nginx enforcing them.

Flower 1.42 serves the Fleet, Control and Runtime APIs on one port; ``medflower.deploy.proxy`` lets
hospitals reach only the Fleet paths it pins. These tests read the paths from the installed Flower
(its routers and the clients its SuperNode and CLI use), so a Flower upgrade that moves, adds or
renames one fails here, loudly, instead of leaving hospitals refused or the Control API exposed.
Then real nginx (skipped, with the reason, when it is not installed) runs the generated configs on
127.0.0.1 in front of a stand-in SuperLink; tests/test_deploy_netns.py does the same with Flower.
"""

from __future__ import annotations

import datetime as dt
import http.client
import http.server
import inspect
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from fastapi.routing import APIRoute

from medflower.deploy import certs, proxy


def _routes(module: str) -> set[str]:
    import importlib

    router = importlib.import_module(module).router
    return {r.path for r in router.routes if isinstance(r, APIRoute)}


def _client_paths(cls: type) -> set[str]:
    import re

    return set(re.findall(r'path="([^"]+)"', inspect.getsource(cls)))


def test_fleet_paths_are_pinned_to_flowers_router_and_supernode_client() -> None:
    from flwr.supernode.fleet_http_client import FleetHttpClient

    served = _routes("flwr.superlink.routers.fleet.router")
    assert served == set(proxy.FLEET_PATHS), f"Flower's Fleet routes moved: {sorted(served ^ set(proxy.FLEET_PATHS))}"
    assert _client_paths(FleetHttpClient) == set(proxy.FLEET_PATHS)
    assert all(p.startswith(proxy.FLEET_PREFIX) for p in served)


def test_an_authenticated_supernode_never_self_registers() -> None:
    """The proxy drops register-node/unregister-node: a node with a registered key does not call them."""
    from flwr.supernode import fleet_http_connection

    lines = inspect.getsource(fleet_http_connection.http_request_response).splitlines()
    for call in ("client.RegisterNode", "client.UnregisterNode"):
        where = [i for i, line in enumerate(lines) if call in line]
        assert where, call
        for i in where:  # each call sits under `if self_registered:` (a node without an auth key)
            guard = next(line for line in reversed(lines[:i]) if line.strip().startswith("if "))
            assert guard.strip() == "if self_registered:", (call, guard)
    assert set(proxy.HOSPITAL_FLEET_PATHS) == set(proxy.FLEET_PATHS) - set(proxy.SELF_REGISTRATION_PATHS)


def test_control_and_runtime_paths_are_pinned() -> None:
    from flwr.supercore.control.control_http_client import ControlHttpClient

    control = _routes("flwr.superlink.routers.control.router")
    assert control and all(p.startswith(proxy.CONTROL_PREFIX) for p in control)
    assert set(proxy.ADMIN_CONTROL_PATHS) <= control, set(proxy.ADMIN_CONTROL_PATHS) - control
    assert _client_paths(ControlHttpClient) <= control  # what the flwr CLI calls, the admin port forwards
    runtime = _routes("flwr.supercore.routers.runtime.router")
    assert runtime and all(p.startswith(proxy.RUNTIME_PREFIX) for p in runtime)
    # the three APIs do not overlap: a Fleet-only rule cannot let Control or Runtime through
    assert not control & set(proxy.FLEET_PATHS) and not runtime & set(proxy.FLEET_PATHS)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pki")
    fed = certs.make_federation_certs(root / "certs", names=["coordinator"], ips=["127.0.0.1"])
    site = certs.make_node_key(root / "site", site="hospital-a")
    other = certs.make_federation_certs(root / "other", names=["elsewhere"], ips=[])
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    expired = certs.sign_client_csr(root / "certs", site.csr, days=2, not_before=old).rename(root / "expired.crt")
    return {
        "certs": root / "certs",
        "ca": fed.ca_cert,
        "cert": certs.sign_client_csr(root / "certs", site.csr),
        "key": site.tls_key,
        "foreign": certs.sign_client_csr(root / "other", site.csr),
        "expired": expired,
        "other_ca": other.ca_cert,
        "root": root,
    }


def test_coordinator_config_forwards_only_fleet_to_hospitals_and_control_to_admins(pki, tmp_path: Path) -> None:
    conf = proxy.write_coordinator_proxy(
        certs=pki["certs"],
        out=tmp_path / "p",
        listen="0.0.0.0:9093",
        admin_port=9094,
        superlink="127.0.0.1:9095",
        admin_networks=["10.0.5.7", "192.168.1.0/24"],
    ).read_text()
    hospital, admin = conf.split("# Administrators:")
    assert "ssl_verify_client on;" in hospital and "ssl_verify_depth 1;" in hospital
    names = "|".join(p.removeprefix(proxy.FLEET_PREFIX) for p in proxy.HOSPITAL_FLEET_PATHS)
    assert f"location ~ ^/v1/fleet/({names})$" in hospital
    assert "register-node" not in hospital and "/v1/control" not in hospital
    assert "listen 0.0.0.0:9094 ssl;" in admin and "ssl_verify_client" not in admin
    for net in ("127.0.0.0/8", "::1", "10.0.5.7/32", "192.168.1.0/24"):
        assert f"allow {net};" in admin
    assert "deny all;" in admin and "location /v1/control/" in admin and "/v1/fleet" not in admin
    assert "server 127.0.0.1:9095;" in conf
    # no admin network: the admin port listens on the loopback interface only
    lone = proxy.write_coordinator_proxy(
        certs=pki["certs"],
        out=tmp_path / "q",
        listen="0.0.0.0:9093",
        admin_port=9094,
        superlink="127.0.0.1:9095",
        admin_networks=[],
    ).read_text()
    assert "listen 127.0.0.1:9094 ssl;" in lone


def test_proxy_config_errors_name_the_argument(pki, tmp_path: Path) -> None:
    def coordinator(*, certs: Path = pki["certs"], listen: str = "0.0.0.0:9093", superlink: str = "127.0.0.1:9095",
                    networks: tuple[str, ...] = ()) -> Path:  # fmt: skip
        return proxy.write_coordinator_proxy(
            certs=certs, out=tmp_path / "p", listen=listen, admin_port=9094, superlink=superlink,
            admin_networks=list(networks),
        )  # fmt: skip

    with pytest.raises(ValueError, match="--superlink 10.0.0.1:9095: the SuperLink must listen on a loopback"):
        coordinator(superlink="10.0.0.1:9095")
    with pytest.raises(ValueError, match="--admin-network 'lan'"):
        coordinator(networks=("lan",))
    with pytest.raises(ValueError, match="--listen 'nowhere'"):
        coordinator(listen="nowhere")
    (tmp_path / "c").mkdir()
    shutil.copy(pki["ca"], tmp_path / "c" / "ca.crt")
    shutil.copy(pki["certs"] / "coordinator.crt", tmp_path / "c" / "coordinator.crt")
    with pytest.raises(ValueError, match="--certs .*coordinator.key: file not found"):
        coordinator(certs=tmp_path / "c")

    def sidecar(*, coordinator: str = "coordinator:9093", cert: Path = pki["cert"], key: Path = pki["key"],
                listen: str = "127.0.0.1:9092") -> None:  # fmt: skip
        proxy.write_hospital_proxy(
            coordinator=coordinator, ca=pki["ca"], client_cert=cert, client_key=key, out=tmp_path / "h", listen=listen
        )

    with pytest.raises(ValueError, match="--coordinator-name NAME"):
        sidecar(coordinator="10.0.0.1:9093")
    with pytest.raises(ValueError, match="--client-cert .*not issued by the federation CA"):
        sidecar(cert=pki["foreign"])
    with pytest.raises(ValueError, match="--client-cert .*ask the administrator to renew it"):
        sidecar(cert=pki["expired"])
    with pytest.raises(ValueError, match="--client-key .* does not belong to --client-cert"):
        sidecar(key=certs.make_node_key(tmp_path / "k", site="b").tls_key)
    with pytest.raises(ValueError, match="--listen 0.0.0.0:9092: the sidecar listens on a loopback address only"):
        sidecar(listen="0.0.0.0:9092")


def test_sidecar_config_listens_on_loopback_and_presents_the_client_certificate(pki, tmp_path: Path) -> None:
    conf, loopback = proxy.write_hospital_proxy(
        coordinator="10.0.0.1:9093",
        coordinator_name="coordinator",
        ca=pki["ca"],
        client_cert=pki["cert"],
        client_key=pki["key"],
        out=tmp_path / "h",
        listen="127.0.0.1:9092",
    )
    text = conf.read_text()
    assert "listen 127.0.0.1:9092 ssl;" in text and "server 10.0.0.1:9093;" in text
    assert f"proxy_ssl_certificate {pki['cert'].resolve()};" in text and "proxy_ssl_name coordinator;" in text
    assert "proxy_ssl_verify on;" in text and "/v1/control" not in text and "register-node" not in text
    assert not (tmp_path / "h" / "loopback-ca.key").exists()  # the loopback CA signs once, its key is dropped
    assert (loopback.key.stat().st_mode & 0o777) == 0o600


# ---- nginx itself, on 127.0.0.1 ----

NGINX = shutil.which("nginx")
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian: apt-get install nginx)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _StandIn(http.server.BaseHTTPRequestHandler):
    """A stand-in SuperLink: answers 200 and the path, so a test sees what nginx forwarded."""

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        body = f"superlink saw {self.path}".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


def _nginx(conf: Path) -> subprocess.Popen:
    argv = proxy.nginx_argv(conf)
    test = subprocess.run([*argv[:-2], "-t"], capture_output=True, text=True)
    assert test.returncode == 0, test.stderr
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _request(port: int, path: str, *, ca: Path, cert: Path | None = None, key: Path | None = None) -> tuple[int, str]:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    deadline = time.monotonic() + 10
    while True:
        try:
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
            conn.request("POST", path, body=b"x")
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@needs_nginx
def test_nginx_enforces_the_coordinator_and_sidecar_rules(pki, tmp_path: Path) -> None:
    sl_port, hosp_port, admin_port, side_port = (_free_port() for _ in range(4))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", sl_port), _StandIn)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["certs"] / "coordinator.crt", pki["certs"] / "coordinator.key")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    coord = proxy.write_coordinator_proxy(
        certs=pki["certs"], out=tmp_path / "c", listen=f"127.0.0.1:{hosp_port}", admin_port=admin_port,
        superlink=f"127.0.0.1:{sl_port}", admin_networks=[],
    )  # fmt: skip
    side, loopback = proxy.write_hospital_proxy(
        coordinator=f"127.0.0.1:{hosp_port}", coordinator_name="coordinator", ca=pki["ca"], client_cert=pki["cert"],
        client_key=pki["key"], out=tmp_path / "s", listen=f"127.0.0.1:{side_port}",
    )  # fmt: skip
    procs = [_nginx(coord), _nginx(side)]
    try:
        ca, cert, key = pki["ca"], pki["cert"], pki["key"]
        pull = "/v1/fleet/pull-messages"
        assert _request(hosp_port, pull, ca=ca, cert=cert, key=key) == (200, f"superlink saw {pull}")
        status, body = _request(hosp_port, pull, ca=ca)
        assert status == 400 and proxy.CERT_REFUSED in body and "(NONE)" in body
        for bad in ("foreign", "expired"):
            status, body = _request(hosp_port, pull, ca=ca, cert=pki[bad], key=key)
            assert status == 400 and proxy.CERT_REFUSED in body, (bad, body)
        for path in ("/v1/control/list-runs", "/v1/fleet/register-node", "/v1/runtime/pull-app-inputs", "/"):
            assert _request(hosp_port, path, ca=ca, cert=cert, key=key)[0] == 403, path
        assert _request(admin_port, "/v1/control/list-runs", ca=ca) == (200, "superlink saw /v1/control/list-runs")
        assert _request(admin_port, pull, ca=ca)[0] == 403
        # the sidecar: the SuperNode's side (loopback CA), the hospital's client certificate upstream
        assert _request(side_port, pull, ca=loopback.ca_cert) == (200, f"superlink saw {pull}")
        assert _request(side_port, "/v1/control/list-runs", ca=loopback.ca_cert)[0] == 403
        access = (tmp_path / "c" / "access.log").read_text()
        assert 'client="CN=hospital-a"' in access and "verify=SUCCESS" in access
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)
        server.shutdown()
        server.server_close()


def test_proxy_config_command_prints_the_config_path_and_names_missing_flags(pki, tmp_path: Path, capsys) -> None:
    from medflower.cli import main as cli

    argv = ["deploy", "proxy-config", "coordinator", "--out", str(tmp_path / "p"), "--listen", "0.0.0.0:9093"]
    assert cli(argv) == 2
    assert "--certs and --superlink are required" in capsys.readouterr().err
    assert cli([*argv, "--certs", str(pki["certs"]), "--superlink", "127.0.0.1:9095"]) == 0
    assert capsys.readouterr().out.strip() == str((tmp_path / "p" / "nginx.conf").resolve())
    side = ["deploy", "proxy-config", "hospital", "--out", str(tmp_path / "s"), "--listen", "127.0.0.1:9092"]
    assert cli([*side, "--coordinator", "coordinator:9093"]) == 2
    assert "--ca, --client-cert, --client-key required" in capsys.readouterr().err
