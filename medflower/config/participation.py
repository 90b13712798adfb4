"""``participation:`` — who must take part in a round and what happens when a site drops."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medflower.schema import rng_field


@dataclass(frozen=True)
class ParticipationConfig:
    # minimum sites whose valid replies a round needs; None means all sampled sites
    min_sites: int | None = rng_field(None, min=1)
    round_timeout: float = rng_field(3600.0, min=1.0)
    on_too_few: Literal["continue", "stop"] = "continue"
