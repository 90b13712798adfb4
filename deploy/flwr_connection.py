"""Add a SuperLink connection to Flower's CLI config (``$FLWR_HOME/config.toml``).

``flwr run``, ``flwr supernode register`` and ``flwr ls`` find the coordinator through a named
connection in that file. Flower 1.42 creates the file with only a local-simulation entry and has no
command that adds a remote one, and hand-editing TOML is where relative certificate paths slip in
(the CLI resolves them against its own working directory). This writes an entry with an absolute
``root-certificates`` path, keeping every other entry of the file as it was.
"""

from __future__ import annotations

from pathlib import Path

import tomli
import tomli_w
from flwr.cli.flower_config import init_flwr_config
from flwr.supercore.utils import get_flwr_home

from medflower.deploy.certs import check_site_name


def add_connection(*, name: str, address: str, ca_cert: str | Path, make_default: bool = True) -> Path:
    """Write ``[superlink.<name>]`` (address, root-certificates) and return the config file's path."""
    check_site_name(name)
    if ":" not in address:
        raise ValueError(f"--address {address!r}: give HOST:PORT (e.g. coordinator.example.org:9093)")
    ca = Path(ca_cert).expanduser().resolve()
    if not ca.is_file():
        raise ValueError(f"--ca {ca}: file not found (the federation's ca.crt from the administrator)")
    init_flwr_config()
    path = get_flwr_home() / "config.toml"
    data = tomli.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    superlink = data.setdefault("superlink", {})
    superlink[name] = {"address": address, "root-certificates": str(ca)}
    if make_default:
        superlink["default"] = name
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path
