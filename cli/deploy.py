"""``medflower deploy ...`` and ``medflower node check``: the deployment subcommands."""

from __future__ import annotations

import argparse

from cryptography import x509

from medflower.deploy.certs import describe_cert, make_federation_certs, make_node_key


def _certs(args: argparse.Namespace) -> int:
    res = make_federation_certs(
        args.out, names=args.name or [], ips=args.ip or [], days=args.days, ca_days=args.ca_days
    )
    d = describe_cert(x509.load_pem_x509_certificate(res.coordinator_cert.read_bytes()))
    print(f"{'kept existing' if res.reused_ca else 'created'} CA: {res.ca_cert} (key {res.ca_key}: keep it offline)")
    print(
        f"coordinator certificate: {res.coordinator_cert} for {d['dns'] + d['ips']}, "
        f"valid until {d['not_after']:%Y-%m-%d}; key {res.coordinator_key}"
    )
    print(f"give every hospital {res.ca_cert}")
    return 0


def _node_key(args: argparse.Namespace) -> int:
    res = make_node_key(args.out, site=args.site, overwrite=args.overwrite)
    print(f"private key: {res.private_key} (stays on this machine)")
    print(f"public key:  {res.public_key} (send it to the federation's administrator)")
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
            timeout=args.timeout,
        )
    )


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``deploy`` (certs, node-key, connection) and ``node`` (check)."""
    dp = sub.add_parser("deploy", help="set up a real federation: certificates, node keys, CLI connection")
    dsub = dp.add_subparsers(dest="deploy_command", required=True)

    p = dsub.add_parser("certs", help="(administrator) create the federation CA and the coordinator's TLS certificate")
    p.add_argument("--out", required=True, help="folder for ca.crt, ca.key, coordinator.crt, coordinator.key")
    p.add_argument("--name", action="append", help="DNS name hospitals use for the coordinator (repeatable)")
    p.add_argument("--ip", action="append", help="IP address hospitals use for the coordinator (repeatable)")
    p.add_argument("--days", type=int, default=365, help="coordinator certificate validity (default 365)")
    p.add_argument("--ca-days", type=int, default=1825, help="CA validity when a new CA is made (default 1825)")
    p.set_defaults(func=_certs)

    p = dsub.add_parser("node-key", help="(hospital) create this site's node authentication key pair")
    p.add_argument("--site", required=True, help="site name, e.g. hospital-a (names the files)")
    p.add_argument("--out", required=True, help="folder for <site>.key and <site>.pub")
    p.add_argument("--overwrite", action="store_true", help="replace an existing key (re-register the .pub)")
    p.set_defaults(func=_node_key)

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
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--site-config", help="this site's site YAML")
    g.add_argument("--node-config", help='raw Flower node config, e.g. "partition-id=0 num-partitions=3"')
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the coordinator (default 5)")
    p.set_defaults(func=_node_check)
