"""The coordinator's half of differential privacy (see ``privacy:`` in the experiment YAML).

* Mode ``sample`` (DP-SGD at each site, ledgers kept by the sites, :mod:`medflower.client.privacy`):
  :class:`SiteLedgerScreen` wraps the whole strategy. A site whose budget is exhausted replies
  ``dp-budget-exhausted: 1`` with no weights; the screen keeps that reply as a valid answer (so the
  round's participation count and the per-site record in ``summary.json`` show it), logs it, and
  aggregates the other sites only. The round's train metrics carry ``dp-epsilon`` = the largest
  epsilon any site reported (the worst-off patient's guarantee) and ``dp-sites-refused``.
* Mode ``client`` (client-level DP): Flower's own wrappers
  (``DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping``) with Flower's RDP
  accountant (``flwr.serverapp.RdpAccountant``, Google's dp-accounting), inside
  :class:`ClientLevelDP`, which derives the noise multiplier from the whole planned run, reports
  ``dp-epsilon`` every round, accounts the adaptive variants (Flower's adaptive wrappers have no
  accountant; Andrew et al. 2021 show that they spend what a Gaussian mechanism with the user's
  noise multiplier spends per round) and stops configuring training rounds, saying so, when the
  next one would exceed the budget. Client-level DP bounds each site's influence on a *mean*, so
  it needs FedAvg's aggregation with uniform weights (Flower enforces it for accounting); the
  weights are made uniform here, on the server, not trusted from the sites.

:func:`wrap_client_dp` is called by :func:`medflower.strategies.build_strategy` around the base strategy
(inside the update screen); :func:`wrap_privacy` by the ServerApp around the finished strategy.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from medflower import keys
from medflower.config import ExperimentConfig
from medflower.schema import ConfigError

DP_SITES_REFUSED = "dp-sites-refused"  # train metric (mode sample): sites that refused this round


def _metrics_of(msg: Message) -> MetricRecord | None:
    recs = msg.content.metric_records
    return next(iter(recs.values())) if len(recs) == 1 else None


def _site(msg: Message) -> str:
    if keys.SITE in msg.content.config_records:
        return str(msg.content.config_records[keys.SITE].get(keys.SITE_NAME, msg.metadata.src_node_id))
    return f"node-{msg.metadata.src_node_id}"


def is_refusal(msg: Message) -> bool:
    """A site's reply saying its DP budget is exhausted (it trained nothing and sent no weights)."""
    if msg.has_error():
        return False
    m = _metrics_of(msg)
    return m is not None and int(m.get(keys.DP_EXHAUSTED, 0)) == 1  # type: ignore[arg-type]


class _Delegating(Strategy):
    """Reads and writes unknown attributes on the wrapped base strategy (like ``RobustStrategy``)."""

    _OWN: frozenset[str] = frozenset()

    def __getattr__(self, name: str) -> Any:
        if name in ("strategy", "base") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.__dict__.get("base", self.__dict__.get("strategy")), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._OWN or "base" not in self.__dict__:
            object.__setattr__(self, name, value)
        else:
            setattr(self.base, name, value)

    # evaluation carries no private update: both DP wrappers pass it through unchanged
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)


class SiteLedgerScreen(_Delegating):
    """Mode ``sample``: keep sites' budget refusals out of aggregation, logged and recorded."""

    _OWN = frozenset({"strategy", "base", "_logged"})

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self._logged: set[str] = set()
        self.base = strategy

    def _split(self, server_round: int, replies: Iterable[Message]) -> tuple[list[Message], list[Message]]:
        rest, refused = [], []
        for msg in replies:
            (refused if is_refusal(msg) else rest).append(msg)
        for msg in refused:
            mid = f"{server_round}/{msg.metadata.message_id}/{_site(msg)}"
            if mid not in self._logged:
                self._logged.add(mid)
                m = _metrics_of(msg) or {}
                log(
                    WARNING,
                    "round %d: %s refused to train: its privacy budget is exhausted (epsilon %.4f of %.4f "
                    "spent at delta %g; one more round would reach %.4f); aggregating the other sites",
                    server_round,
                    _site(msg),
                    float(m.get(keys.DP_EPSILON, float("nan"))),
                    float(m.get(keys.DP_TARGET_EPSILON, float("nan"))),
                    float(m.get(keys.DP_DELTA, float("nan"))),
                    float(m.get(keys.DP_EPSILON_NEXT, float("nan"))),
                )
        return rest, refused

    def screen_train_replies(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[list[Message], list[dict[str, Any]]]:
        """The inner screen's verdict on real updates; refusals stay valid replies (not failures)."""
        rest, refused = self._split(server_round, replies)
        inner = getattr(self.strategy, "screen_train_replies", None)
        if inner is None:
            return rest + refused, []
        ok, rejected = inner(server_round, rest)
        return list(ok) + refused, rejected

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._logged = {k for k in self._logged if not k.startswith(f"{server_round - 1}/")}
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        rest, refused = self._split(server_round, replies)
        eps = [
            float(m[keys.DP_EPSILON])
            for msg in replies
            if not msg.has_error()  # type: ignore[arg-type]
            if (m := _metrics_of(msg)) is not None and keys.DP_EPSILON in m
        ]
        arrays, metrics = None, None
        if any(not m.has_error() for m in rest):
            arrays, metrics = self.strategy.aggregate_train(server_round, rest)
        else:
            log(
                WARNING,
                "round %d: every site that replied refused to train (privacy budgets exhausted); "
                "global model unchanged",
                server_round,
            )
        # a weighted mean of per-site ledgers means nothing: keep the strategy's other metrics only
        out = MetricRecord({k: v for k, v in (metrics or {}).items() if not k.startswith("dp-")})
        if eps:
            out[keys.DP_EPSILON] = max(eps)  # the FedAvg mean of epsilons means nothing: report the worst site
        out[DP_SITES_REFUSED] = len(refused)
        return arrays, out

    def summary(self) -> None:
        log(INFO, "\t├──> Sample-level DP (medflower): per-site ledgers; sites out of budget are left out")
        self.strategy.summary()


def _flower_accountant(exp: ExperimentConfig, num_sites: int):
    from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

    try:
        return RdpAccountant(
            PrivacyConfig(
                target_delta=exp.privacy.target_delta,
                population_size=num_sites,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
                max_epsilon=exp.privacy.target_epsilon,
            )
        )
    except ImportError as err:  # Flower's accountant needs Google's dp-accounting
        raise ConfigError(
            f"privacy.mode 'client' needs the package dp-accounting ({err}); pip install dp-accounting"
        ) from err


def client_noise_multiplier(exp: ExperimentConfig, *, num_sites: int, num_sampled: int) -> float:
    """The configured noise multiplier, else the one that spends the budget over ``train.rounds`` releases.

    Searched with Opacus' ``get_noise_multiplier`` (sampling rate 1: no amplification, as Flower's
    fixed-clipping accounting requires), then checked with Flower's own accountant.
    """
    from flwr.serverapp import GaussianPrivacyEvent
    from opacus.accountants.utils import get_noise_multiplier

    p = exp.privacy
    if p.noise_multiplier is not None:
        return p.noise_multiplier
    try:
        sigma = float(
            get_noise_multiplier(
                target_epsilon=p.target_epsilon,
                target_delta=p.target_delta,
                sample_rate=1.0,
                steps=exp.train.rounds,
                accountant="rdp",
            )
        )
    except ValueError as err:
        raise ConfigError(
            f"privacy.target_epsilon: {p.target_epsilon} at delta {p.target_delta} cannot be reached "
            f"over {exp.train.rounds} rounds by any noise multiplier ({err})"
        ) from err
    acc = _flower_accountant(exp, num_sites)
    for _ in range(100):  # Flower's orders differ from Opacus'; never exceed the budget by rounding
        event = GaussianPrivacyEvent(noise_multiplier=sigma, sample_size=num_sampled, population_size=num_sites)
        if not acc.would_exceed(event, count=exp.train.rounds):
            return sigma
        sigma *= 1.01
    raise ConfigError(f"privacy.target_epsilon: {p.target_epsilon} is not reachable with Flower's accountant")


class ClientLevelDP(_Delegating):
    """Mode ``client``: Flower's DP wrapper + Flower's accountant, epsilon reported every round."""

    _OWN = frozenset(
        {
            "strategy",
            "base",
            "accountant",
            "noise_multiplier",
            "num_sampled",
            "population",
            "own_accounting",
            "exhausted",
        }
    )

    def __init__(
        self,
        strategy: Strategy,
        *,
        base: FedAvg,
        accountant: Any,
        noise_multiplier: float,
        num_sampled: int,
        population: int,
        own_accounting: bool,
    ) -> None:
        self.strategy = strategy  # Flower's DP wrapper
        self.accountant = accountant
        self.noise_multiplier = noise_multiplier  # the user's z (adaptive wrappers split it internally)
        self.num_sampled = num_sampled
        self.population = population
        self.own_accounting = own_accounting  # Flower's adaptive wrappers have no accountant
        self.exhausted = False
        self.base = base

    def _event(self):
        from flwr.serverapp import GaussianPrivacyEvent

        return GaussianPrivacyEvent(
            noise_multiplier=self.noise_multiplier, sample_size=self.num_sampled, population_size=self.population
        )

    def epsilon(self) -> float:
        return float(self.accountant.get_privacy_spent().epsilon) if self.accountant.num_releases else 0.0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        from flwr.serverapp.exception import PrivacyBudgetExhausted

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
            return list(self.strategy.configure_train(server_round, arrays, config, grid))
        except PrivacyBudgetExhausted as err:
            self.exhausted = True
            log(WARNING, "round %d: %s", server_round, err)
            return []
        except ValueError as err:  # Flower: the sample size differs from num_sampled_clients
            log(WARNING, "round %d: client-level DP round skipped: %s", server_round, err)
            return []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for msg in replies:  # uniform weights: a site's influence on the mean must not depend on its size
            m = _metrics_of(msg) if not msg.has_error() else None
            if m is not None:
                m[keys.DP_UNIT_WEIGHT] = 1
        key = self.base.weighted_by_key
        self.base.weighted_by_key = keys.DP_UNIT_WEIGHT
        try:
            arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        finally:
            self.base.weighted_by_key = key
        if arrays is not None and self.own_accounting:
            self.accountant.compose(self._event())
            log(
                INFO,
                "Privacy spent: epsilon=%.6f at delta=%g after %d releases",
                self.epsilon(),
                self.accountant.config.target_delta,
                self.accountant.num_releases,
            )
        out = MetricRecord({k: v for k, v in (metrics or {}).items() if k != keys.DP_UNIT_WEIGHT})
        out[keys.DP_EPSILON] = self.epsilon()
        out[keys.DP_DELTA] = float(self.accountant.config.target_delta)
        out[keys.DP_NOISE_MULTIPLIER] = float(self.noise_multiplier)
        out[keys.DP_CLIPPING_NORM] = float(getattr(self.strategy, "clipping_norm", float("nan")))
        return arrays, out

    def summary(self) -> None:
        log(
            INFO,
            "\t├──> Client-level DP (medflower): noise multiplier %.4f, budget epsilon %s at delta %g",
            self.noise_multiplier,
            self.accountant.config.max_epsilon,
            self.accountant.config.target_delta,
        )
        self.strategy.summary()

    # strategies.state protocol: a restarted coordinator continues the accountant
    def state_dict(self) -> dict[str, Any]:
        return {"accountant": json.dumps(self.accountant.state_dict(), sort_keys=True)}

    def load_state_dict(self, state: dict[str, Any]) -> set[str]:
        if "accountant" not in state:  # fresh start
            self.accountant.load_state_dict({**self.accountant.state_dict(), "compositions": []})
            self.exhausted = False
            return set()
        self.accountant.load_state_dict(json.loads(str(state["accountant"])))
        return {"accountant"}


def wrap_client_dp(strategy: Strategy, exp: ExperimentConfig, *, num_sites: int) -> Strategy:
    """Mode ``client``: ``strategy`` inside Flower's DP wrapper and :class:`ClientLevelDP`; else unchanged."""
    p = exp.privacy
    if p.mode != "client":
        return strategy
    from flwr.serverapp import strategy as fl

    if not isinstance(strategy, FedAvg) or type(strategy).aggregate_train is not FedAvg.aggregate_train:
        raise ConfigError(
            f"privacy.mode 'client' needs a strategy that aggregates with FedAvg's mean (fedavg, fedprox); "
            f"strategy.name is {exp.strategy.name!r}, whose aggregation has another sensitivity"
        )
    num_sampled = max(int(num_sites * strategy.fraction_train), strategy.min_train_nodes)
    sigma = client_noise_multiplier(exp, num_sites=num_sites, num_sampled=num_sampled)
    accountant = _flower_accountant(exp, num_sites)
    if p.clipping == "fixed":
        cls = (
            fl.DifferentialPrivacyServerSideFixedClipping
            if p.clipping_side == "server"
            else fl.DifferentialPrivacyClientSideFixedClipping
        )
        wrapped = cls(strategy, sigma, p.clipping_norm, num_sampled, accountant=accountant)
        own = False
    else:
        cls = (
            fl.DifferentialPrivacyServerSideAdaptiveClipping
            if p.clipping_side == "server"
            else fl.DifferentialPrivacyClientSideAdaptiveClipping
        )
        try:
            wrapped = cls(
                strategy,
                sigma,
                num_sampled,
                initial_clipping_norm=p.clipping_norm,
                target_clipped_quantile=p.target_clipped_quantile,
                clip_norm_lr=p.clip_norm_lr,
                clipped_count_stddev=p.clipped_count_stddev,
            )
        except ValueError as err:  # the count noise must be > sigma/2 for the update noise to exist
            std = p.clipped_count_stddev if p.clipped_count_stddev is not None else num_sampled / 20
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
        exp.train.rounds,
        num_sampled,
        num_sites,
        p.target_epsilon,
        p.target_delta,
    )
    return ClientLevelDP(
        wrapped,
        base=strategy,
        accountant=accountant,
        noise_multiplier=sigma,
        num_sampled=num_sampled,
        population=num_sites,
        own_accounting=own,
    )


def find_client_dp(strategy: Strategy) -> ClientLevelDP | None:
    s: Any = strategy
    seen: set[int] = set()
    while s is not None and id(s) not in seen:
        seen.add(id(s))
        if isinstance(s, ClientLevelDP):
            return s
        s = s.__dict__.get("strategy") if hasattr(s, "__dict__") else None
    return None


def wrap_privacy(strategy: Strategy, exp: ExperimentConfig, *, num_sites: int) -> Strategy:
    """The ServerApp's last step: the site-ledger screen (mode sample), a check (mode client)."""
    if exp.privacy.mode == "sample":
        name = exp.strategy.name
        if name == "scaffold" or (name == "fedprox" and exp.strategy.typed_params().proximal_mu > 0):
            raise ConfigError(
                f"privacy.mode 'sample' cannot be combined with strategy.name {name!r}: it edits the sites' local "
                "loss or gradients, which Opacus' DP optimizer would overwrite; use privacy.mode 'client'"
            )
        return SiteLedgerScreen(strategy)
    if exp.privacy.mode == "client" and find_client_dp(strategy) is None:
        raise RuntimeError(
            "privacy.mode is 'client' but the strategy carries no client-level DP wrapper "
            "(strategies.build_strategy must call strategies.privacy.wrap_client_dp)"
        )
    return strategy
