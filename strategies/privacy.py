"""The coordinator's half of differential privacy (see ``privacy:`` in the experiment YAML).

* Mode ``sample`` (DP-SGD at each site, ledgers kept by the sites, :mod:`medflower.client.privacy`):
  a site whose budget is exhausted replies ``dp-budget-exhausted: 1`` with no weights. The round's
  ledger screen (:class:`medflower.server.screens.LedgerRefusals`) sets such replies aside: they
  count as answers (participation, the per-site record), are logged, and are not aggregated.
  :func:`sample_round_metrics` reports the largest epsilon any site spent (the worst-off
  patient's guarantee) and how many sites refused.
* Mode ``client`` (client-level DP): Flower's own wrappers
  (``DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping``) aggregate, as they are,
  with Flower's RDP accountant (``flwr.serverapp.RdpAccountant``, Google's dp-accounting).
  :class:`ClientLevelDP` is a stage of the round pipeline beside them, not a wrapper: it derives
  the noise multiplier from the whole planned run, stops configuring training rounds (saying so)
  when the next one would exceed the budget, accounts the adaptive variants (Flower's adaptive
  wrappers have no accountant; Andrew et al. 2021 show that they spend what a Gaussian mechanism
  with the user's noise multiplier spends per round) and reports ``dp-epsilon`` every round.
  Client-level DP bounds each site's influence on a *mean*, so the round weighs every site
  uniformly (``RoundParts.weighting``), on the server; weights are never trusted from the sites.
  Its accountant survives a coordinator restart through ``state_dict()`` / ``load_state_dict()``.

Which methods each mode admits is declared by the methods themselves (``Method.privacy``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import (
    GaussianPrivacyEvent,
    Grid,
    NeighboringRelation,
    RdpAccountant,
    SamplingMethod,
)
from flwr.serverapp import PrivacyConfig as FlowerPrivacyConfig
from flwr.serverapp import strategy as fl
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import FedAvg, Strategy

from medflower import keys
from medflower.config.privacy import PrivacyConfig
from medflower.schema import ConfigError

DP_SITES_REFUSED = "dp-sites-refused"  # train metric (mode sample): sites that refused this round


def metrics_of(msg: Message) -> MetricRecord | None:
    recs = msg.content.metric_records
    return next(iter(recs.values())) if len(recs) == 1 else None


def is_refusal(msg: Message) -> bool:
    """A site's reply saying its DP budget is exhausted (it trained nothing and sent no weights)."""
    if msg.has_error():
        return False
    m = metrics_of(msg)
    value = m.get(keys.DP_EXHAUSTED, 0) if m is not None else 0
    return not isinstance(value, list) and int(value) == 1


def sample_round_metrics(replies: Iterable[Message], refused: int, metrics: MetricRecord | None) -> MetricRecord:
    """Mode ``sample``: the strategy's metrics less its meaningless mean of per-site ledgers, plus the
    worst site's epsilon and the number of sites that refused to train."""
    eps = []
    for msg in replies:
        m = None if msg.has_error() else metrics_of(msg)
        if m is not None and keys.DP_EPSILON in m:
            eps.append(float(m[keys.DP_EPSILON]))  # type: ignore[arg-type]  # a scalar: screened
    out = MetricRecord({k: v for k, v in (metrics or {}).items() if not k.startswith("dp-")})
    if eps:
        out[keys.DP_EPSILON] = max(eps)
    out[DP_SITES_REFUSED] = refused
    return out


def flower_accountant(privacy: PrivacyConfig, num_sites: int) -> RdpAccountant:
    try:
        return RdpAccountant(
            FlowerPrivacyConfig(
                target_delta=privacy.target_delta,
                population_size=num_sites,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
                max_epsilon=privacy.target_epsilon,
            )
        )
    except ImportError as err:  # Flower's accountant needs Google's dp-accounting
        raise ConfigError(
            f"privacy.mode 'client' needs the package dp-accounting ({err}); pip install dp-accounting"
        ) from err


def client_noise_multiplier(privacy: PrivacyConfig, *, rounds: int, num_sites: int, num_sampled: int) -> float:
    """The configured noise multiplier, else the one that spends the budget over ``rounds`` releases.

    Searched with Opacus' ``get_noise_multiplier`` (sampling rate 1: no amplification, as Flower's
    fixed-clipping accounting requires), then checked with Flower's own accountant.
    """
    from opacus.accountants.utils import get_noise_multiplier  # Opacus takes ~5 s to import; only mode client

    if privacy.noise_multiplier is not None:
        return privacy.noise_multiplier
    try:
        sigma = float(
            get_noise_multiplier(
                target_epsilon=privacy.target_epsilon,
                target_delta=privacy.target_delta,
                sample_rate=1.0,
                steps=rounds,
                accountant="rdp",
            )
        )
    except ValueError as err:
        raise ConfigError(
            f"privacy.target_epsilon: {privacy.target_epsilon} at delta {privacy.target_delta} cannot be reached "
            f"over {rounds} rounds by any noise multiplier ({err})"
        ) from err
    acc = flower_accountant(privacy, num_sites)
    for _ in range(100):  # Flower's orders differ from Opacus'; never exceed the budget by rounding
        event = GaussianPrivacyEvent(noise_multiplier=sigma, sample_size=num_sampled, population_size=num_sites)
        if not acc.would_exceed(event, count=rounds):
            return sigma
        sigma *= 1.01
    raise ConfigError(f"privacy.target_epsilon: {privacy.target_epsilon} is not reachable with Flower's accountant")


class ClientLevelDP:
    """Mode ``client``: the accounting stage beside Flower's DP wrapper (see the module docstring)."""

    def __init__(
        self,
        *,
        base: FedAvg,
        accountant: RdpAccountant,
        noise_multiplier: float,
        num_sampled: int,
        population: int,
        own_accounting: bool,
    ) -> None:
        self.base = base  # the FedAvg inside Flower's wrapper
        self.accountant = accountant
        self.noise_multiplier = noise_multiplier  # the user's z (adaptive wrappers split it internally)
        self.num_sampled = num_sampled
        self.population = population
        self.own_accounting = own_accounting  # Flower's adaptive wrappers have no accountant
        self.exhausted = False

    def _event(self) -> GaussianPrivacyEvent:
        return GaussianPrivacyEvent(
            noise_multiplier=self.noise_multiplier, sample_size=self.num_sampled, population_size=self.population
        )

    def epsilon(self) -> float:
        return float(self.accountant.get_privacy_spent().epsilon) if self.accountant.num_releases else 0.0

    def configure_train(
        self, wrapper: Strategy, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Flower's wrapper configures the round, unless the budget cannot pay for it (then no messages)."""
        if self.accountant.would_exceed(self._event()):
            if not self.exhausted:
                log(
                    WARNING,
                    "round %d: client-level privacy budget exhausted (epsilon %.4f of %.4f spent at delta %g); "
                    "no further training rounds are configured",
                    server_round,
                    self.epsilon(),
                    self.accountant.config.max_epsilon,
                    self.accountant.config.target_delta,
                )
            self.exhausted = True
            return []
        try:
            return list(wrapper.configure_train(server_round, arrays, config, grid))
        except PrivacyBudgetExhausted as err:
            self.exhausted = True
            log(WARNING, "round %d: %s", server_round, err)
            return []
        except ValueError as err:  # Flower: the sample size differs from num_sampled_clients
            log(WARNING, "round %d: client-level DP round skipped: %s", server_round, err)
            return []

    def record(self, wrapper: Strategy, aggregated: bool, metrics: MetricRecord | None) -> MetricRecord:
        """Account the round's release (adaptive variants) and add the privacy metrics."""
        if aggregated and self.own_accounting:
            self.accountant.compose(self._event())
            log(
                INFO,
                "Privacy spent: epsilon=%.6f at delta=%g after %d releases",
                self.epsilon(),
                self.accountant.config.target_delta,
                self.accountant.num_releases,
            )
        out = MetricRecord(dict(metrics or {}))
        out[keys.DP_EPSILON] = self.epsilon()
        out[keys.DP_DELTA] = float(self.accountant.config.target_delta)
        out[keys.DP_NOISE_MULTIPLIER] = float(self.noise_multiplier)
        out[keys.DP_CLIPPING_NORM] = float(getattr(wrapper, "clipping_norm", float("nan")))
        return out

    # survives a coordinator restart (server.checkpoint)
    def state_dict(self) -> dict[str, Any]:
        return {"accountant": json.dumps(self.accountant.state_dict(), sort_keys=True)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "accountant" not in state:  # fresh start
            self.accountant.load_state_dict({**self.accountant.state_dict(), "compositions": []})
            self.exhausted = False
            return
        self.accountant.load_state_dict(json.loads(str(state["accountant"])))


def build_client_dp(
    base: Strategy, privacy: PrivacyConfig, *, rounds: int, num_sites: int
) -> tuple[Strategy, ClientLevelDP]:
    """Mode ``client``: ``base`` inside Flower's DP wrapper, and the accounting stage beside it."""
    if not isinstance(base, FedAvg):  # the registry refuses other methods first; this guards the type
        raise ConfigError(f"privacy.mode 'client' needs a FedAvg-family strategy, got {type(base).__name__}")
    num_sampled = max(int(num_sites * base.fraction_train), base.min_train_nodes)
    sigma = client_noise_multiplier(privacy, rounds=rounds, num_sites=num_sites, num_sampled=num_sampled)
    accountant = flower_accountant(privacy, num_sites)
    wrapped: Strategy
    if privacy.clipping == "fixed":
        fixed = (
            fl.DifferentialPrivacyServerSideFixedClipping
            if privacy.clipping_side == "server"
            else fl.DifferentialPrivacyClientSideFixedClipping
        )
        wrapped = fixed(base, sigma, privacy.clipping_norm, num_sampled, accountant=accountant)
        own = False
    else:
        adaptive = (
            fl.DifferentialPrivacyServerSideAdaptiveClipping
            if privacy.clipping_side == "server"
            else fl.DifferentialPrivacyClientSideAdaptiveClipping
        )
        try:
            wrapped = adaptive(
                base,
                sigma,
                num_sampled,
                initial_clipping_norm=privacy.clipping_norm,
                target_clipped_quantile=privacy.target_clipped_quantile,
                clip_norm_lr=privacy.clip_norm_lr,
                clipped_count_stddev=privacy.clipped_count_stddev,
            )
        except ValueError as err:  # the count noise must be > sigma/2 for the update noise to exist
            std = privacy.clipped_count_stddev if privacy.clipped_count_stddev is not None else num_sampled / 20
            raise ConfigError(
                f"privacy.clipped_count_stddev: {std:g} (None = Flower's default num_sampled/20) is too low for "
                f"adaptive clipping at noise multiplier {sigma:.4f}; it must exceed noise_multiplier/2 = "
                f"{sigma / 2:.4f} (Flower: {err})"
            ) from err
        own = True
    log(
        INFO,
        "client-level DP: %s, noise multiplier %.4f for %d rounds of %d of %d sites (budget epsilon %s, delta %g)",
        type(wrapped).__name__,
        sigma,
        rounds,
        num_sampled,
        num_sites,
        privacy.target_epsilon,
        privacy.target_delta,
    )
    stage = ClientLevelDP(
        base=base,
        accountant=accountant,
        noise_multiplier=sigma,
        num_sampled=num_sampled,
        population=num_sites,
        own_accounting=own,
    )
    return wrapped, stage
