"""Keep deploy/README.md honest: each command it shows must be one the tested lab actually ran.

A command matches when a recorded command has the same program (by base name) and sub-commands
and uses at least the README's flags. Code blocks preceded by ``<!-- not exercised: REASON -->``
(the container commands: no Docker engine in the test environment) are skipped and listed by
:func:`skipped_blocks` so the exemption stays visible. Blocks preceded by ``<!-- walkthrough -->``
(the one-host rehearsal) are not the lab's: tests/test_deploy_walkthrough.py runs them verbatim,
in order, as one shell session (:func:`walkthrough_blocks`).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parent / "README.md"
CHECKED = ("medflower", "flwr", "start-coordinator.sh", "start-hospital.sh")
_BLOCK = re.compile(
    r"(?:<!--\s*(not exercised:|walkthrough)[^>]*-->\s*\n)?```(?:bash|sh|shell|console)\n(.*?)```", re.S
)
WALKTHROUGH = "walkthrough"


def _blocks(text: str) -> list[tuple[str, str]]:
    """(tag, text) of every shell block: tag "" (the lab runs it), "not exercised:" or "walkthrough"."""
    return [(m.group(1) or "", m.group(2)) for m in _BLOCK.finditer(text)]


def _lines(block: str) -> list[str]:
    out, cur = [], ""
    for raw in block.splitlines():
        line = raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        if cur.strip():
            out.append(cur.strip().removeprefix("$ "))
        cur = ""
    return out


def readme_commands(path: Path = README) -> list[str]:
    """Every command line of the README's exercised code blocks."""
    return [line for tag, block in _blocks(path.read_text(encoding="utf-8")) if not tag for line in _lines(block)]


def skipped_blocks(path: Path = README) -> list[str]:
    return [block for tag, block in _blocks(path.read_text(encoding="utf-8")) if tag.startswith("not exercised")]


def walkthrough_blocks(path: Path = README) -> list[str]:
    """The one-host walkthrough's shell blocks, in page order, as the page shows them."""
    return [block for tag, block in _blocks(path.read_text(encoding="utf-8")) if tag == WALKTHROUGH]


def signature(argv: list[str]) -> tuple[str, tuple[str, ...], frozenset[str]]:
    """(program base name, sub-commands, flags) of a command line."""
    while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):  # leading VAR=value assignments
        argv = argv[1:]
    if not argv:
        return "", (), frozenset()
    prog = Path(argv[0]).name
    subs: list[str] = []
    if prog in ("medflower", "flwr"):
        for tok in argv[1:]:
            if tok.startswith("-") or len(subs) == 2 or not re.match(r"^[a-z][a-z-]*$", tok):
                break
            subs.append(tok)
            if prog == "flwr" and tok in ("run", "ls", "stop"):
                break
    flags = frozenset(t.split("=")[0] for t in argv[1:] if t.startswith("--"))
    return prog, tuple(subs), flags


def unexercised(commands: list[str], recorded: list[list[str]]) -> list[str]:
    """README command lines with no matching recorded command (or with a program not checked)."""
    sigs = [signature(list(r)) for r in recorded]
    missing = []
    for line in commands:
        prog, subs, flags = signature(shlex.split(line))
        if prog not in CHECKED:
            missing.append(f"{line}   (program {prog!r} is not one the lab runs: {', '.join(CHECKED)})")
            continue
        if not any(p == prog and s == subs and flags <= f for p, s, f in sigs):
            missing.append(line)
    return missing


def synthetic_export(folder: Path, *, n: int, seed: int) -> None:
    """A synthetic 'folders' export for the walkthrough (tests/test_deploy_walkthrough.py,
    bench/deploy_rounds.py): ``n`` 28x28 PNGs per class; class 1 holds a bright blob, class 0 only noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    for label in (0, 1):
        d = folder / str(label)
        d.mkdir(parents=True)
        for i in range(n):
            img = rng.normal(0.3, 0.1, (28, 28))
            if label:
                cy, cx = rng.integers(8, 20, 2)
                img += 0.5 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 18.0)
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), "L").save(d / f"img{i:03d}.png")
