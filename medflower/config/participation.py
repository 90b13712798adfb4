"""``participation:`` — who must take part in a round and what happens when a site drops.

Example (experiment YAML)::

    participation:
      min_sites: 2          # a round counts only with valid updates from >= 2 sites
      round_timeout: 600    # seconds to wait for stragglers in each train/evaluate step
      startup_timeout: 900  # seconds to wait for every site to connect before round 1
      on_too_few: continue  # fewer than min_sites replied: keep the model and go on ("stop": end the run)

In deployment these are enforced by ``medflower.server.participation`` (waiting for sites) and
``medflower.server.loop.run_rounds`` (timeouts, too few replies); every absence is recorded in summary.json
under the round's ``failures``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medflower.schema import rng_field


@dataclass(frozen=True)
class ParticipationConfig:
    # minimum sites whose valid replies a round needs; None means all sampled sites
    min_sites: int | None = rng_field(None, min=1)
    # seconds a round's train (and evaluate) step waits for replies; later replies are dropped
    round_timeout: float = rng_field(3600.0, min=1.0)
    # seconds the run waits, before its first round, for every site to connect; after that it goes
    # ahead with the sites that are connected (at least min_sites; Flower waits for those)
    startup_timeout: float = rng_field(600.0, min=0.0)
    # fewer than min_sites valid replies: "continue" keeps the global model for that round,
    # "stop" ends the run (summary.json is still written)
    on_too_few: Literal["continue", "stop"] = "continue"
