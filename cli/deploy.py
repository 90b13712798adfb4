"""``medflower deploy ...`` and ``medflower node check``: the deployment subcommands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cryptography import x509

from medflower.deploy.certs import describe_cert, make_federation_certs, make_node_key, sign_client_csr


def _certs(args: argparse.Namespace) -> int:
    if not args.client_csr or args.name or args.ip:
        res = make_federation_certs(
            args.out, names=args.name or [], ips=args.ip or [], days=args.days, ca_days=args.ca_days
        )
        d = describe_cert(x509.load_pem_x509_certificate(res.coordinator_cert.read_bytes()))
        print(
            f"{'kept existing' if res.reused_ca else 'created'} CA: {res.ca_cert} (key {res.ca_key}: keep it offline)"
        )
        print(
            f"coordinator certificate: {res.coordinator_cert} for {d['dns'] + d['ips']}, "
            f"valid until {d['not_after']:%Y-%m-%d}; key {res.coordinator_key}"
        )
        print(f"give every hospital {res.ca_cert}")
    for csr in args.client_csr or []:
        path = sign_client_csr(args.out, csr, days=args.days)
        d = describe_cert(x509.load_pem_x509_certificate(path.read_bytes()))
        print(
            f"client certificate: {path} for {d['subject']}, valid until {d['not_after']:%Y-%m-%d}; "
            "give it to that hospital (with ca.crt)"
        )
    return 0


def _node_key(args: argparse.Namespace) -> int:
    res = make_node_key(args.out, site=args.site, overwrite=args.overwrite)
    print(f"node key:        {res.private_key} (stays on this machine)")
    print(f"TLS client key:  {res.tls_key} (stays on this machine)")
    print(f"public key:      {res.public_key} (send it to the federation's administrator)")
    print(f"signing request: {res.csr} (send it to the administrator, who returns your certificate)")
    return 0


def _register(args: argparse.Namespace) -> int:
    # here, not at the top: deploy.sites loads Flower and numpy (~3 s), which `medflower --help` must not pay
    from medflower.deploy.sites import directory_path, register_site

    path = directory_path(args.directory)
    site = register_site(
        directory=path,
        name=args.name,
        pub=Path(args.key),
        declared_examples=args.declared_examples,
        connection=args.connection,
    )
    print(f"registered {site.name} as node {site.node_id} (key sha256 {site.key_sha256[:16]}) in {path}")
    return 0


def _unregister(args: argparse.Namespace) -> int:
    from medflower.deploy.sites import directory_path, unregister_site  # lazy: see _register

    path = directory_path(args.directory)
    site = unregister_site(directory=path, name=args.name, connection=args.connection)
    print(f"unregistered {site.name} (node {site.node_id}): Flower refuses its key; removed from {path}")
    return 0


def _sites(args: argparse.Namespace) -> int:
    from medflower.deploy.sites import directory_path, format_sites, site_statuses  # lazy: see _register

    path = directory_path(args.directory)
    rows = site_statuses(path, connection=args.connection, ask_flower=not args.offline)
    print(format_sites(rows) if rows else f"no site registered in {path}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from medflower.deploy.sites import directory_path  # lazy: see _register
    from medflower.deploy.status import status_report

    path = directory_path(args.directory)
    print(
        status_report(
            path,
            connection=args.connection,
            output_dirs=[Path(d) for d in args.output_dir or []],
            ask_flower=not args.offline,
        )
    )
    return 0


def _proxy_config(args: argparse.Namespace) -> int:
    from medflower.deploy import proxy  # lazy: see _register

    if args.role == "coordinator":
        if not args.certs or not args.superlink:
            raise ValueError("proxy-config coordinator: --certs and --superlink are required")
        conf = proxy.write_coordinator_proxy(
            certs=args.certs,
            out=args.out,
            listen=args.listen,
            admin_port=args.admin_port,
            superlink=args.superlink,
            admin_networks=args.admin_network or [],
        )
    else:
        missing = [f for f, v in (("--coordinator", args.coordinator), ("--ca", args.ca)) if not v]
        missing += [f for f, v in (("--client-cert", args.client_cert), ("--client-key", args.client_key)) if not v]
        if missing:
            raise ValueError(f"proxy-config hospital: {', '.join(missing)} required")
        conf, _ = proxy.write_hospital_proxy(
            coordinator=args.coordinator,
            coordinator_name=args.coordinator_name,
            ca=args.ca,
            client_cert=args.client_cert,
            client_key=args.client_key,
            out=args.out,
            listen=args.listen,
        )
    print(conf, file=sys.stdout)
    return 0


def _connection(args: argparse.Namespace) -> int:
    from medflower.deploy.flwr_connection import add_connection  # here, not at the top: Flower's CLI (--help speed)

    path = add_connection(name=args.name, address=args.address, ca_cert=args.ca, make_default=not args.no_default)
    print(f"wrote connection {args.name!r} ({args.address}) to {path}")
    return 0


def _node_check(args: argparse.Namespace) -> int:
    from medflower.deploy.nodecheck import report, run_checks  # here, not at the top: torch, Flower (--help speed)

    node_config = args.node_config or (f"site-config='{args.site_config}'" if args.site_config else "")
    return report(
        run_checks(
            coordinator=args.coordinator,
            ca=args.ca,
            key=args.key,
            node_config=node_config,
            pub=args.pub,
            client_cert=args.client_cert,
            client_key=args.client_key,
            timeout=args.timeout,
        )
    )


def _node_fingerprint(args: argparse.Namespace) -> int:
    """The key's fingerprint as `medflower deploy sites` and the coordinator's log print it (16 hex digits)."""
    from medflower.deploy.certs import key_sha256, load_node_private_key, public_key_line

    key = Path(args.key)
    line = key if key.suffix == ".pub" else public_key_line(load_node_private_key(key))
    print(key_sha256(line)[:16])
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``deploy`` (certs, node-key, connection, register, unregister, sites, proxy-config) and
    ``node`` (check)."""
    dp = sub.add_parser("deploy", help="set up a real federation: certificates, node keys, CLI connection")
    dsub = dp.add_subparsers(dest="deploy_command", required=True)

    p = dsub.add_parser(
        "certs",
        help="(administrator) create the federation CA and the coordinator's TLS certificate; sign hospitals' CSRs",
    )
    p.add_argument("--out", required=True, help="folder for ca.crt, ca.key, coordinator.crt, coordinator.key")
    p.add_argument("--name", action="append", help="DNS name hospitals use for the coordinator (repeatable)")
    p.add_argument("--ip", action="append", help="IP address hospitals use for the coordinator (repeatable)")
    p.add_argument(
        "--client-csr",
        action="append",
        help="a hospital's <site>.csr: sign it, writing <out>/clients/<site>.crt (repeatable; again = renew)",
    )
    p.add_argument("--days", type=int, default=365, help="certificate validity (default 365)")
    p.add_argument("--ca-days", type=int, default=1825, help="CA validity when a new CA is made (default 1825)")
    p.set_defaults(func=_certs)

    p = dsub.add_parser("node-key", help="(hospital) create this site's node authentication key pair")
    p.add_argument("--site", required=True, help="site name, e.g. hospital-a (names the files)")
    p.add_argument("--out", required=True, help="folder for <site>.key and <site>.pub")
    p.add_argument(
        "--overwrite", action="store_true", help="replace existing keys (re-register the .pub, have the .csr signed)"
    )
    p.set_defaults(func=_node_key)

    directory_help = "the coordinator's site directory (default: $MEDFLOWER_SITE_DIRECTORY)"
    connection_help = "flwr connection name (default: the flwr CLI's default connection)"
    p = dsub.add_parser("register", help="(administrator) admit a hospital's node key under its site name")
    p.add_argument("--name", required=True, help="the site name its replies are recorded under")
    p.add_argument("--key", required=True, help="the hospital's <site>.pub")
    p.add_argument("--declared-examples", type=int, help="data set size it declared (bounds its weight: capped)")
    p.add_argument("--directory", help=directory_help)
    p.add_argument("--connection", help=connection_help)
    p.set_defaults(func=_register)

    p = dsub.add_parser("unregister", help="(administrator) revoke a hospital's node key and remove its entry")
    p.add_argument("--name", required=True, help="the site name it was registered under")
    p.add_argument("--directory", help=directory_help)
    p.add_argument("--connection", help=connection_help)
    p.set_defaults(func=_unregister)

    p = dsub.add_parser("sites", help="(administrator) the registered hospitals: name, node id, key, online")
    p.add_argument("--directory", help=directory_help)
    p.add_argument("--connection", help=connection_help)
    p.add_argument("--offline", action="store_true", help="do not ask the SuperLink for each node's status")
    p.set_defaults(func=_sites)

    p = dsub.add_parser(
        "status",
        help="(administrator) each hospital's name, node id, key, connected or last seen; runs and their round",
    )
    p.add_argument("--directory", help=directory_help)
    p.add_argument("--connection", help=connection_help)
    p.add_argument(
        "--output-dir", action="append", help="a run's output-dir: the round its checkpoint reached (repeatable)"
    )
    p.add_argument("--offline", action="store_true", help="do not ask the SuperLink (names and keys only)")
    p.set_defaults(func=_status)

    p = dsub.add_parser(
        "proxy-config",
        help="(launch scripts) write the nginx config of the coordinator's proxy or a hospital's sidecar",
    )
    p.add_argument("role", choices=["coordinator", "hospital"])
    p.add_argument("--out", required=True, help="folder for nginx.conf, its logs (and the sidecar's loopback certs)")
    p.add_argument(
        "--listen", required=True, help="HOST:PORT nginx listens on (the hospital port; a sidecar: 127.0.0.1)"
    )
    p.add_argument("--certs", help="coordinator: folder with ca.crt, coordinator.crt, coordinator.key")
    p.add_argument("--admin-port", type=int, default=9094, help="coordinator: Control API port (default 9094)")
    p.add_argument("--admin-network", action="append", help="coordinator: a network allowed on the admin port (CIDR)")
    p.add_argument("--superlink", help="coordinator: the SuperLink's loopback HOST:PORT")
    p.add_argument("--coordinator", help="hospital: the coordinator's HOST:PORT")
    p.add_argument("--coordinator-name", help="hospital: DNS name in the coordinator's certificate (default: HOST)")
    p.add_argument("--ca", help="hospital: the federation's ca.crt")
    p.add_argument("--client-cert", help="hospital: its client certificate")
    p.add_argument("--client-key", help="hospital: its <site>.tls.key")
    p.set_defaults(func=_proxy_config)

    p = dsub.add_parser("connection", help="(administrator) add the coordinator to the flwr CLI's config.toml")
    p.add_argument("--name", default="medflower", help="connection name used by `flwr run . NAME` (default medflower)")
    p.add_argument("--address", required=True, help="coordinator HOST:PORT")
    p.add_argument("--ca", required=True, help="the federation's ca.crt")
    p.add_argument("--no-default", action="store_true", help="do not make it the default connection")
    p.set_defaults(func=_connection)

    np_ = sub.add_parser("node", help="hospital node tools")
    nsub = np_.add_subparsers(dest="node_command", required=True)
    p = nsub.add_parser("check", help="check this hospital's setup before the first run")
    p.add_argument("--coordinator", required=True, help="coordinator HOST:PORT (as in its certificate)")
    p.add_argument("--ca", required=True, help="the federation's ca.crt")
    p.add_argument("--key", required=True, help="this site's private node key")
    p.add_argument("--pub", help="this site's .pub, to check it matches the key")
    p.add_argument("--client-cert", help="this site's client certificate (the coordinator's proxy requires it)")
    p.add_argument("--client-key", help="this site's <site>.tls.key")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--site-config", help="this site's site YAML")
    g.add_argument("--node-config", help='raw Flower node config, e.g. "partition-id=0 num-partitions=3"')
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the coordinator (default 5)")
    p.set_defaults(func=_node_check)
    p = nsub.add_parser(
        "fingerprint",
        help="print this node key's fingerprint, as the administrator's `medflower deploy sites` shows it",
    )
    p.add_argument("--key", required=True, help="this site's private node key (or its .pub)")
    p.set_defaults(func=_node_fingerprint)
