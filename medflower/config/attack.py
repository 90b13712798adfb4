"""``attack:`` — SIMULATION-ONLY research switch: chosen simulated sites send poisoned updates.

It exists to measure how robust an aggregation strategy is (see ``bench/strategies.py --attack``).
Only the simulation's ClientApp applies it; a deployed hospital node refuses an experiment that
asks for it (before any work, naming the rule), so a coordinator's config can never make a real site
sabotage a run.
See :mod:`medflower.simulation.attack`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medflower.schema import ConfigError, rng_field

AttackKind = Literal["none", "sign_flip", "nonfinite", "wrong_shape"]


@dataclass(frozen=True)
class AttackConfig:
    """``sign_flip``: the site sends ``global - scale * (local - global)``;
    ``nonfinite``: its weights contain NaN and Inf; ``wrong_shape``: one array has a wrong shape."""

    kind: AttackKind = "none"
    sites: tuple[str, ...] = ()  # public site names, e.g. ["site-0"]
    scale: float = rng_field(10.0, min=0.0, exclusive_min=True)

    def __post_init__(self) -> None:
        if self.kind != "none" and not self.sites:
            raise ConfigError("attack.sites: name at least one site (e.g. [site-0]) when attack.kind is set")
