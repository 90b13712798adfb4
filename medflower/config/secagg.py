"""``secure_aggregation:`` — SecAgg+ (Bell et al., CCS 2020): the coordinator learns only the sum.

Example (experiment YAML)::

    secure_aggregation:
      mode: secagg+
      num_shares: 3                  # each site secret-shares its keys with this many sites (itself included)
      reconstruction_threshold: 2    # shares needed to rebuild a dropped site's mask; also the collusion bound
      clipping_range: 8.0            # each coordinate of a (weighted) update is clipped to [-8, 8]
      quantization_range: 4194304    # ... and quantized to integers in [0, 4194304]
      modulus_range: 4294967296      # masks and sums live modulo this
      max_weight: 1000               # a site's weight (examples) is capped here, then scaled to [0, 1]

Run by :mod:`medflower.server.secagg` (coordinator) and :mod:`medflower.client.secagg` (sites); the
quantization is Flower's (``flwr.common.secure_aggregation.quantization``): a site's update ``x``
with weight ``w`` is sent as ``quantize((w / max_weight) * x)`` together with its quantized weight
``w / max_weight``, both masked; the coordinator divides the unmasked sums.

The relations checked at load time (each error names the key):

* ``2 <= reconstruction_threshold <= num_shares <= partition.num_sites`` and
  ``2 * reconstruction_threshold > num_shares`` (Bell et al.: below a majority of a site's
  neighbours, a coordinator that claims a live site dropped could obtain both of its secrets);
* ``quantization_range < 2**31`` (Flower's stochastic rounding works in int32);
* ``partition.num_sites * quantization_range < modulus_range``: the sum of every site's quantized
  coordinates (each at most ``quantization_range``, since ``w / max_weight <= 1`` and every
  coordinate is clipped to ``clipping_range``) must not wrap around the modulus;
* ``(partition.num_sites + 1) * modulus_range < 2**63``: sums of masked vectors are int64.

The quantization step is ``2 * clipping_range / quantization_range`` on ``(w / max_weight) * x``:
the unmasked mean is within ``n * step / sum_i(w_i / max_weight)`` of the exact weighted mean of
``n`` sites' updates (see :func:`quantization_error_bound`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medflower.schema import ConfigError, rng_field

SecAggMode = Literal["none", "secagg+"]
INT32_LIMIT = 2**31
INT64_LIMIT = 2**63


@dataclass(frozen=True)
class SecureAggregationConfig:
    mode: SecAggMode = "none"
    # each site Shamir-shares its two secrets with this many sites, itself included (Flower's ring of
    # neighbours); clamped to the number of sampled sites in a round. Odd unless it equals that number.
    num_shares: int = rng_field(3, min=2)
    # shares needed to reconstruct a secret: dropouts are recovered while this many sites remain, and a
    # coordinator colluding with this many sites could unmask an update
    reconstruction_threshold: int = rng_field(2, min=2)
    # every coordinate of the weighted update (model change, control variate change) is clipped to
    # [-clipping_range, clipping_range] before quantization
    clipping_range: float = rng_field(8.0, min=0.0, exclusive_min=True)
    quantization_range: int = rng_field(4194304, min=256)
    modulus_range: int = rng_field(4294967296, min=512)
    # a site's weight (its training examples, strategy.weighting 'examples') is capped at this value
    max_weight: float = rng_field(1000.0, min=0.0, exclusive_min=True)

    def __post_init__(self) -> None:
        if self.reconstruction_threshold > self.num_shares:
            raise ConfigError(
                f"secure_aggregation.reconstruction_threshold: {self.reconstruction_threshold} is larger than "
                f"secure_aggregation.num_shares {self.num_shares}; a secret split into {self.num_shares} shares "
                "cannot need more of them"
            )
        if 2 * self.reconstruction_threshold <= self.num_shares:
            raise ConfigError(
                f"secure_aggregation.reconstruction_threshold: {self.reconstruction_threshold} must be more than "
                f"half of secure_aggregation.num_shares ({self.num_shares}); otherwise a coordinator could obtain "
                "both secrets of a live site (Bell et al. 2020)"
            )
        if self.quantization_range >= INT32_LIMIT:
            raise ConfigError(
                f"secure_aggregation.quantization_range: {self.quantization_range} must be below 2**31 "
                "(Flower's stochastic rounding quantizes to int32)"
            )

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def check_sites(self, num_sites: int) -> None:
        """The relations that involve the federation's size (``partition.num_sites``)."""
        if not self.enabled:
            return
        if num_sites < 2:
            raise ConfigError(
                f"secure_aggregation.mode: 'secagg+' needs at least 2 sites; partition.num_sites is {num_sites}"
            )
        if self.num_shares > num_sites:
            raise ConfigError(
                f"secure_aggregation.num_shares: {self.num_shares} is larger than partition.num_sites {num_sites}"
            )
        if num_sites * self.quantization_range >= self.modulus_range:
            raise ConfigError(
                f"secure_aggregation.modulus_range: {self.modulus_range} would overflow: {num_sites} sites x "
                f"secure_aggregation.quantization_range {self.quantization_range} = "
                f"{num_sites * self.quantization_range} must stay below it (raise modulus_range or lower "
                "quantization_range)"
            )
        if (num_sites + 1) * self.modulus_range >= INT64_LIMIT:
            raise ConfigError(
                f"secure_aggregation.modulus_range: {self.modulus_range} is too large for {num_sites} sites: "
                f"({num_sites} + 1) x modulus_range must stay below 2**63 (masked sums are int64)"
            )


def quantization_error_bound(config: SecureAggregationConfig, *, num_sites: int, total_ratio: float) -> float:
    """Worst-case per-coordinate error of an unmasked weighted mean of ``num_sites`` updates.

    ``total_ratio`` is the sum of the sites' ``w / max_weight``. Each site's stochastic rounding errs by
    less than one step ``2 c / Q`` on ``ratio * x``; the mean divides the sum of those errors by the
    sum of the ratios. (A site's ratio is itself rounded to a multiple of ``1 / Q`` and the site
    scales by that rounded ratio, so update and weight stay consistent.)
    """
    step = 2.0 * config.clipping_range / config.quantization_range
    return float("inf") if total_ratio <= 0 else num_sites * step / total_ratio


def secagg_refusal(
    config: SecureAggregationConfig,
    *,
    method_refusal: str | None,
    strategy_name: str,
    max_update_norm: float | None,
    weighting: str,
    privacy_mode: str,
    clipping_side: str,
) -> str | None:
    """Why ``secure_aggregation.mode 'secagg+'`` cannot run with these settings (None if it can).

    SecAgg+ gives the coordinator only the weighted sum of the updates: anything on the coordinator
    that must see one site's update is refused, with both settings named. The method's own answer
    comes from the registry (``Method.secure_aggregation``: robust aggregators, QFedAvg).
    """
    if not config.enabled:
        return None
    head = "secure_aggregation.mode 'secagg+' cannot be combined with"
    if method_refusal is not None:
        return f"{head} strategy.name {strategy_name!r}: {method_refusal}"
    if max_update_norm is not None:
        return (
            f"{head} strategy.max_update_norm {max_update_norm}: the norm bound screens each site's update, "
            "which the coordinator no longer sees (bound each coordinate with secure_aggregation.clipping_range)"
        )
    if weighting == "capped":
        return (
            f"{head} strategy.weighting 'capped': its cap depends on the round's median claim, known only after "
            "each site has scaled and masked its update; use 'examples' (capped at secure_aggregation.max_weight) "
            "or 'uniform'"
        )
    if privacy_mode == "client" and clipping_side == "server":
        return (
            f"{head} privacy.mode 'client' with privacy.clipping_side 'server': the coordinator would have to clip "
            "each site's update; set privacy.clipping_side: client (the sites clip, the coordinator adds the noise "
            "to the sum)"
        )
    return None
