"""Seeds for bit-reproducible runs: one experiment seed, every random stream derived from it.

Why a derivation and not ``seed + round``: two streams must never coincide (site A's round 2 with
site B's round 1), and a name must map to the same number in every process; Python's ``hash()`` is
salted per process, so the site name goes through SHA-256 instead. The server (node sampling), the
sites (batch order, augmentation, dropout) and the model's initialisation all draw from seeds made
here, so that the same YAML gives the same ``summary.json`` metrics on every run and engine.

What stays unseeded on purpose: differential-privacy noise. The site's DP-SGD noise and Poisson
sampling use torch generators seeded from :mod:`secrets`; Flower's server-side noise in client-level
DP comes from NumPy's global generator, which is therefore never seeded here. Noise that can be
replayed is no privacy. :func:`reproducibility` says so in ``summary.json``.
"""

from __future__ import annotations

import hashlib
import random
import sys
from typing import Any

import torch


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for the stream named by ``parts`` (e.g. ``"train", site, round``) under ``seed``."""
    text = "\x1f".join([str(int(seed)), *(str(p) for p in parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def seed_everything(seed: int) -> None:
    """Seed Python's ``random`` and torch's generator, and ask torch for deterministic kernels
    (``warn_only``: an op without a deterministic kernel warns instead of failing the run).

    NumPy's global generator is left alone: medflower's own code draws from explicit generators, and
    the only global draws are Flower's client-level DP noise, which must stay unpredictable."""
    random.seed(seed)
    torch.manual_seed(seed)
    deterministic_kernels()


def deterministic_kernels() -> None:
    """``torch.use_deterministic_algorithms(True, warn_only=True)``, without its 1.1 s import.

    Why not the public call alone: it imports ``torch._inductor.config`` only to set the compiler's
    flag, which costs about 1.1 s on a 2-core machine, in every process that seeds (the simulator, each
    Ray worker, each deployed ClientApp process): most of a short run's fixed cost (issue 11).
    medflower never calls ``torch.compile``, so when the compiler is not loaded the kernel flag is set
    directly; when it is (a user's own code compiled something) the public call sets both."""
    if torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled():
        return
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None or "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        setter(True, warn_only=True)


def reproducibility(exp: Any) -> dict[str, Any]:
    """``summary.json``'s ``reproducible`` flag and, when False, the reason (``reproducible_reason``)."""
    reasons = []
    if exp.privacy.mode == "sample":
        reasons.append(
            "privacy.mode is 'sample': DP-SGD noise and Poisson sampling are seeded from the operating "
            "system (secrets), by design, so they cannot be replayed"
        )
    elif exp.privacy.mode != "none":
        reasons.append(
            f"privacy.mode is {exp.privacy.mode!r}: the coordinator's DP noise is drawn unseeded, by design, "
            "so it cannot be replayed"
        )
    if reasons:
        return {"reproducible": False, "reproducible_reason": "; ".join(reasons)}
    return {"reproducible": True}
