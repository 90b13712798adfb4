"""``partition:`` — how a data set is split into simulated hospitals (see :mod:`medflower.simulation.partition`).

Two independent axes, as in the FL literature: *which cases* a site sees (``kind``: IID, Dirichlet
label skew, pathological k-classes-per-site, or the data's natural groups such as hospital or
scanner) and *how many* (``quantity``: as the label partition gives, a power law, or explicit
relative sizes). Label and quantity skew combine; acquisition shift (``shift:``) combines with both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medflower.schema import ConfigError, rng_field

PartitionKind = Literal["iid", "dirichlet", "pathological", "natural"]
QuantityKind = Literal["none", "power-law", "sizes"]


@dataclass(frozen=True)
class PartitionConfig:
    """Partition of the data set's samples into ``num_sites`` hospitals.

    ``kind``:
      * ``iid`` — every site gets the same case mix;
      * ``dirichlet`` — per class, the site shares are drawn from ``Dir(alpha)`` (small alpha: strong skew);
      * ``pathological`` — each site holds exactly ``classes_per_site`` classes, chosen by
        ``class_assignment`` (Flower's ``PathologicalPartitioner`` modes);
      * ``natural`` — one site per value of the per-sample group ``group`` (a manifest column such as
        ``hospital`` or ``scanner``); ``num_sites`` must equal the number of values.

    ``quantity`` (not with ``natural``): ``none`` keeps the sizes the label partition gives;
    ``power-law`` gives site ``i`` a share proportional to ``(i + 1) ** -exponent`` (site-0 largest);
    ``sizes`` takes relative sizes per site from ``sizes`` (any positive numbers, normalised).
    """

    kind: PartitionKind = "dirichlet"
    num_sites: int = rng_field(3, min=1, max=1000)
    alpha: float = rng_field(0.5, min=0.0, exclusive_min=True)
    classes_per_site: int = rng_field(2, min=1)
    class_assignment: Literal["first-deterministic", "random", "deterministic"] = "first-deterministic"
    group: str | None = None
    quantity: QuantityKind = "none"
    exponent: float = rng_field(1.0, min=0.0)
    sizes: tuple[float, ...] | None = None
    min_site_size: int = rng_field(10, min=0)

    def __post_init__(self) -> None:
        if self.kind == "natural" and not self.group:
            raise ConfigError(
                "partition.group: required when partition.kind is 'natural' "
                "(the per-sample group key, e.g. hospital or scanner)"
            )
        if self.kind != "natural" and self.group:
            raise ConfigError(f"partition.group: only used when partition.kind is 'natural' (kind is {self.kind!r})")
        if self.kind == "natural" and self.quantity != "none":
            raise ConfigError(
                "partition.quantity: must be 'none' with partition.kind 'natural' "
                "(a natural partition's sizes are those of its groups)"
            )
        if self.quantity == "sizes":
            if self.sizes is None:
                raise ConfigError(
                    "partition.sizes: required when partition.quantity is 'sizes' "
                    "(one relative size per site, e.g. [4, 2, 1, 1])"
                )
            if len(self.sizes) != self.num_sites:
                raise ConfigError(
                    f"partition.sizes: has {len(self.sizes)} values but partition.num_sites "
                    f"is {self.num_sites}; give one relative size per site"
                )
            if any(not s > 0 for s in self.sizes):
                raise ConfigError(f"partition.sizes: every size must be > 0, got {list(self.sizes)}")
        elif self.sizes is not None:
            raise ConfigError(
                f"partition.sizes: only used when partition.quantity is 'sizes' (quantity is {self.quantity!r})"
            )
