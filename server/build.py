"""From the experiment to the round's parts: the method's strategy, the privacy stage, the screens.

Everything method-specific comes from the method registry (:mod:`medflower.strategies.registry`):
this module only fills in the :class:`~medflower.strategies.registry.ServerContext` from the
validated config, asks the method for its Flower strategy, and puts Flower's DP wrapper and the
screens around it as plain parts of the round, not as a tower of wrappers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.serverapp.strategy import Strategy

from medflower import keys
from medflower.config import ExperimentConfig
from medflower.modelspec import build_experiment_model
from medflower.server.identity import Identity, read_directory
from medflower.server.release import ReleasedModel
from medflower.server.screens import FiniteMetrics, LedgerRefusals, NormBound, Screen, SiteRefusals, UpdateShape
from medflower.server.secagg import SecAggPlus
from medflower.strategies.methods.fedbn import norm_state_keys
from medflower.strategies.privacy import ClientLevelDP, build_client_dp
from medflower.strategies.registry import Method, ServerContext, get_method
from medflower.strategies.state import load_strategy_state, strategy_state_dict


@dataclass
class RoundParts:
    """What the round pipeline (:mod:`medflower.server.loop`) runs.

    ``strategy`` aggregates: the method's Flower strategy, or Flower's DP wrapper around it in
    privacy mode ``client``; ``base`` is the method's own strategy either way. ``privacy`` is the
    client-level accounting stage (mode ``client``), ``sample_dp`` whether sites keep DP-SGD
    ledgers (mode ``sample``).
    """

    method: Method
    strategy: Strategy
    base: Strategy
    screens: list[Screen]
    eval_screens: list[Screen] = field(default_factory=lambda: [FiniteMetrics()])
    privacy: ClientLevelDP | None = None
    sample_dp: bool = False
    weighting: str = "examples"  # strategy.weighting; "uniform" under client-level DP
    weight_cap_multiple: float = 3.0
    declared_sizes: dict[int, int] = field(default_factory=dict)  # node id -> size declared at registration
    directory_path: Path | None = None  # the coordinator's site directory (deployment); None: names from replies
    identity: Identity | None = None
    secure: SecAggPlus | None = None  # secure_aggregation.mode 'secagg+': the protocol replaces send/collect
    release: ReleasedModel = field(default_factory=lambda: ReleasedModel(decay=0.0))  # strategy.ema_decay

    def refresh_identity(self) -> dict[int, str]:
        """Re-read the site directory (once per round): node id -> registered name."""
        if self.directory_path is None or self.identity is None:
            return {}
        directory = read_directory(self.directory_path)
        self.identity.directory = directory
        self.declared_sizes = {n: s.declared_examples for n, s in directory.items() if s.declared_examples}
        return {n: s.name for n, s in directory.items()}

    def state_dict(self) -> dict[str, Any]:
        """Everything beyond the global model that the next round depends on (for checkpoints)."""
        return {
            "strategy": strategy_state_dict(self.strategy),
            "privacy": self.privacy.state_dict() if self.privacy is not None else {},
            "release": self.release.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_strategy_state(self.strategy, state["strategy"])
        if self.privacy is not None:
            self.privacy.load_state_dict(dict(state.get("privacy") or {}))
        self.release.load_state_dict(dict(state.get("release") or {}))


def flower_kwargs(exp: ExperimentConfig, num_sites: int) -> dict[str, Any]:
    """The keyword arguments every Flower strategy of the FedAvg family takes."""
    s = exp.strategy
    min_sites = min(exp.participation.min_sites or 1, num_sites)
    return {
        "fraction_train": s.fraction_train,
        "fraction_evaluate": s.fraction_evaluate,
        "min_train_nodes": min_sites,
        "min_evaluate_nodes": min_sites if s.fraction_evaluate > 0 else 0,
        "min_available_nodes": num_sites,
        "weighted_by_key": keys.AGG_WEIGHT,  # set by the round's weighting stage, never by a site
        "arrayrecord_key": keys.ARRAYS,
        "configrecord_key": keys.CONFIG,
    }


def server_context(exp: ExperimentConfig, num_sites: int) -> ServerContext:
    def param_keys() -> list[str]:
        return [n for n, p in build_experiment_model(exp).named_parameters() if p.requires_grad]

    def norm_keys() -> list[str]:
        return norm_state_keys(build_experiment_model(exp))

    return ServerContext(
        params=exp.strategy.typed_params(),
        num_sites=num_sites,
        flower=flower_kwargs(exp, num_sites),
        train_lr=exp.train.lr,
        train_optimizer=exp.train.optimizer,
        local_epochs=exp.train.local_epochs,
        param_keys=param_keys,
        norm_keys=norm_keys,
    )


def build_strategy(exp: ExperimentConfig, *, num_sites: int) -> Strategy:
    """The method's own Flower strategy for ``exp`` (no privacy wrapper, no screens)."""
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    return get_method(exp.strategy.name).build(server_context(exp, num_sites))


def build_round(exp: ExperimentConfig, *, num_sites: int, site_directory: Path | None = None) -> RoundParts:
    """The round's parts for ``exp`` with ``num_sites`` sites (the federation's expected size).

    With ``site_directory`` (a deployment), every reply must come from a registered node under its
    registered name (:class:`~medflower.server.identity.Identity`, the first screen).
    Raises :class:`~medflower.schema.ConfigError` naming ``strategy.*`` / ``privacy.*``.
    """
    method = get_method(exp.strategy.name)
    base = build_strategy(exp, num_sites=num_sites)
    strategy, privacy = base, None
    if exp.privacy.mode == "client":
        strategy, privacy = build_client_dp(base, exp.privacy, rounds=exp.train.rounds, num_sites=num_sites)
    identity = Identity({}) if site_directory is not None else None
    screens: list[Screen] = [identity] if identity is not None else []
    screens.append(SiteRefusals())  # before the update checks: a refusal carries no weights
    if exp.privacy.mode == "sample":
        screens.append(LedgerRefusals())  # first: a refusal carries no weights for the next screens to judge
    screens.append(UpdateShape())
    if exp.strategy.max_update_norm is not None:
        screens.append(NormBound(max_norm=exp.strategy.max_update_norm))
    weighting = "uniform" if privacy is not None else exp.strategy.weighting
    secure = None
    if exp.secure_aggregation.enabled:  # compatibility was checked when the config was loaded
        secure = SecAggPlus(
            config=exp.secure_aggregation,
            weighting=weighting,
            reply_spec=lambda spec: method.reply_arrays(spec, base),
        )
    return RoundParts(
        method=method,
        strategy=strategy,
        base=base,
        screens=screens,
        privacy=privacy,
        sample_dp=exp.privacy.mode == "sample",
        weighting=weighting,
        weight_cap_multiple=exp.strategy.weight_cap_multiple,
        eval_screens=[*([identity] if identity is not None else []), SiteRefusals(), FiniteMetrics()],
        directory_path=site_directory,
        identity=identity,
        secure=secure,
        release=ReleasedModel(decay=exp.strategy.ema_decay),
    )
