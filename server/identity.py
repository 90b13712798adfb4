"""Who sent a reply: the site names the administrator registered, by Flower node id.

A reply names its site in its content (``keys.SITE``), which a site writes itself: on its own
word, one hospital could overwrite another's row in ``summary.json`` or claim another's history.
In a deployment the administrator registers every hospital's node key under a name
(``medflower deploy register --name NAME --key PUB``), which also registers the key with Flower's
SuperLink (node authentication) and writes the node id Flower assigned, the name, the key's
fingerprint and the declared data set size to the coordinator's site directory, a JSON file:

```json
{"format": 1, "sites": {"8023417123": {"name": "hospital-a", "key_sha256": "…", "declared_examples": 1200}}}
```

The coordinator then names each reply by the node that sent it (Flower authenticates the node),
and :class:`Identity` rejects a reply from an unregistered node or one that claims another name.
The file is read again every round, so a hospital registered or removed mid-run counts from the
next round on. Flower's SuperLink knows node ids and keys but not which hospital a key belongs to;
hence this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Message

from medflower import keys
from medflower.server.screens import RoundView, Verdict, reject, site_field

DIRECTORY_FORMAT = 1


@dataclass(frozen=True)
class RegisteredSite:
    node_id: int
    name: str
    key_sha256: str = ""
    declared_examples: int | None = None


def read_directory(path: str | Path) -> dict[int, RegisteredSite]:
    """The site directory at ``path``; a malformed file is an error naming the file and the entry."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no site directory; register each hospital with `medflower deploy register`"
        ) from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict) or data.get("format") != DIRECTORY_FORMAT or not isinstance(data.get("sites"), dict):
        raise ValueError(f"{path}: expected {{'format': {DIRECTORY_FORMAT}, 'sites': {{node id: entry}}}}")
    out: dict[int, RegisteredSite] = {}
    for node, entry in data["sites"].items():
        where = f"{path}: sites.{node}"
        if not str(node).isdigit() or not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"{where}: expected a numeric node id and an entry with a string 'name'")
        declared = entry.get("declared_examples")
        if declared is not None and (not isinstance(declared, int) or declared < 1):
            raise ValueError(f"{where}.declared_examples: must be a whole number >= 1, got {declared!r}")
        out[int(node)] = RegisteredSite(int(node), entry["name"], str(entry.get("key_sha256", "")), declared)
    names = [s.name for s in out.values()]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{path}: site name(s) {', '.join(dup)} registered for more than one node")
    return out


def claimed_name(msg: Message) -> str | None:
    return site_field(msg, keys.SITE_NAME)


class Identity:
    """Screen: a reply must come from a registered node and name the site registered for it."""

    def __init__(self, directory: dict[int, RegisteredSite]) -> None:
        self.directory = directory

    def check(self, msg: Message, view: RoundView) -> Verdict | None:
        node = int(msg.metadata.src_node_id)
        site = self.directory.get(node)
        if site is None:
            return reject(f"node {node} is not registered (medflower deploy register)")
        claimed = claimed_name(msg)
        if claimed != site.name:
            return reject(f"node {node} is registered as {site.name!r} but its reply claims to be {claimed!r}")
        return None
