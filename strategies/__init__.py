"""Aggregation strategies, chosen by name in the experiment's ``strategy:`` section.

Flower's strategies (FedAvg, FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad, FedMedian,
FedTrimmedAvg, Krum, MultiKrum, Bulyan, QFedAvg) are used as they are: this package only builds
them from the validated config. What Flower lacks has one module each: :mod:`medflower.strategies.scaffold`,
:mod:`medflower.strategies.fedbn`, :mod:`medflower.strategies.ditto`. Every strategy is wrapped by
:class:`medflower.strategies.robust.RobustStrategy` (bad updates are rejected by site), and
:func:`strategy_state_dict` / :func:`load_strategy_state` save and restore server-side state.
"""

from __future__ import annotations

from logging import WARNING
from typing import Any

from flwr.common.logger import log
from flwr.serverapp import strategy as fl
from flwr.serverapp.strategy import Strategy

from medflower import keys
from medflower.config import ExperimentConfig
from medflower.config.strategy import STRATEGY_NAMES
from medflower.schema import ConfigError
from medflower.strategies.robust import RobustStrategy
from medflower.strategies.state import load_strategy_state, strategy_state_dict

__all__ = [
    "STRATEGIES",
    "RobustStrategy",
    "build_base_strategy",
    "build_strategy",
    "load_strategy_state",
    "strategy_state_dict",
]

STRATEGIES = STRATEGY_NAMES


def _common(exp: ExperimentConfig, num_sites: int) -> dict[str, Any]:
    s = exp.strategy
    min_sites = min(exp.participation.min_sites or 1, num_sites)
    return dict(
        fraction_train=s.fraction_train,
        fraction_evaluate=s.fraction_evaluate,
        min_train_nodes=min_sites,
        min_evaluate_nodes=min_sites if s.fraction_evaluate > 0 else 0,
        min_available_nodes=num_sites,
        weighted_by_key=keys.NUM_EXAMPLES,
        arrayrecord_key=keys.ARRAYS,
        configrecord_key=keys.CONFIG,
    )


def _model_keys(exp: ExperimentConfig) -> tuple[list[str], list[str]]:
    """(trainable parameter names, normalization-layer state keys) of the experiment's model."""
    from medflower.modelspec import build_experiment_model
    from medflower.strategies.fedbn import norm_state_keys

    model = build_experiment_model(exp)
    return [n for n, p in model.named_parameters() if p.requires_grad], norm_state_keys(model)


def build_base_strategy(exp: ExperimentConfig, *, num_sites: int) -> Strategy:
    """The configured strategy without the update screen (what the tests compare with Flower)."""
    s = exp.strategy
    name, p = s.name, s.typed_params()
    common = _common(exp, num_sites)
    if name == "fedavg":
        return fl.FedAvg(**common)
    if name == "fedavgm":
        return fl.FedAvgM(**common, server_learning_rate=p.server_learning_rate, server_momentum=p.server_momentum)
    if name == "fedprox":
        return fl.FedProx(**common, proximal_mu=p.proximal_mu)
    if name in ("fedadam", "fedyogi"):
        cls = fl.FedAdam if name == "fedadam" else fl.FedYogi
        # eta_l is only informational in Flower's FedOpt; the sites' lr is train.lr
        return cls(**common, eta=p.eta, eta_l=exp.train.lr, beta_1=p.beta_1, beta_2=p.beta_2, tau=p.tau)
    if name == "fedadagrad":
        return fl.FedAdagrad(**common, eta=p.eta, eta_l=exp.train.lr, tau=p.tau)
    if name == "fedmedian":
        return fl.FedMedian(**common)
    if name == "fedtrimmedavg":
        if int(p.beta * num_sites) == 0:
            log(
                WARNING,
                "strategy.params.beta=%s trims nothing with %d sites (it cuts int(beta*n) per tail): "
                "FedTrimmedAvg is plain averaging here",
                p.beta,
                num_sites,
            )
        return fl.FedTrimmedAvg(**common, beta=p.beta)
    if name in ("krum", "multikrum", "bulyan"):
        f = p.num_malicious_nodes
        if name == "bulyan" and num_sites < 4 * f + 3:
            raise ConfigError(
                f"strategy.params.num_malicious_nodes: Bulyan needs at least 4*f+3 = {4 * f + 3} "
                f"sites for f={f}; the federation has {num_sites}"
            )
        if f >= num_sites:
            raise ConfigError(
                f"strategy.params.num_malicious_nodes: {f} must be below the number of sites ({num_sites})"
            )
        if num_sites < 2 * f + 3:
            log(WARNING, "strategy %s: Krum's guarantee needs n >= 2f+3 sites (n=%d, f=%d)", name, num_sites, f)
        if name == "krum":
            return fl.Krum(**common, num_malicious_nodes=f)
        if name == "bulyan":
            return fl.Bulyan(**common, num_malicious_nodes=f)
        if p.num_nodes_to_select > num_sites:
            raise ConfigError(
                f"strategy.params.num_nodes_to_select: {p.num_nodes_to_select} exceeds the {num_sites} sites"
            )
        return fl.MultiKrum(**common, num_malicious_nodes=f, num_nodes_to_select=p.num_nodes_to_select)
    if name == "qfedavg":
        return fl.QFedAvg(
            **common, q=p.q, client_learning_rate=p.client_learning_rate or exp.train.lr, train_loss_key=keys.TRAIN_LOSS
        )
    if name == "scaffold":
        from medflower.strategies.scaffold import Scaffold

        if exp.train.optimizer != "sgd":
            log(
                WARNING,
                "SCAFFOLD's control variates assume plain SGD; train.optimizer is %r. "
                "Set train.optimizer: sgd for the method as published",
                exp.train.optimizer,
            )
        params, _ = _model_keys(exp)
        return Scaffold(**common, param_keys=params, num_sites=num_sites, server_learning_rate=p.server_learning_rate)
    if name == "fedbn":
        from medflower.strategies.fedbn import FedBN

        _, norm = _model_keys(exp)
        if not norm:
            raise ConfigError(
                f"strategy.name: 'fedbn' keeps normalization layers local, but model {exp.model.name!r} has none"
            )
        return FedBN(**common, local_keys=norm)
    if name == "ditto":
        from medflower.strategies.ditto import Ditto

        return Ditto(
            **common,
            lam=p.lam,
            personal_epochs=p.personal_epochs or exp.train.local_epochs,
            personal_lr=p.personal_lr or exp.train.lr,
        )
    raise ConfigError(f"strategy.name: invalid value {name!r}; valid choices are " + ", ".join(STRATEGIES))


def build_strategy(exp: ExperimentConfig, *, num_sites: int) -> Strategy:
    """Build the configured strategy; ``num_sites`` is how many nodes the federation expects.

    Raises :class:`ConfigError` naming ``strategy.name`` / ``strategy.params.<key>``.
    """
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    strategy = build_base_strategy(exp, num_sites=num_sites)
    # Client-level DP wrappers (strategies/privacy.py) belong here, inside the update screen, so
    # that a non-finite update is rejected before it is clipped and noised.
    from medflower.strategies.privacy import wrap_client_dp

    strategy = wrap_client_dp(strategy, exp, num_sites=num_sites)  # unchanged unless privacy.mode is client
    return RobustStrategy(strategy, max_update_norm=exp.strategy.max_update_norm)
