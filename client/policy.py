"""A hospital's site policy: what its node agrees to do, checked on every message before any work.

The hospital writes the policy in its site YAML (``policy:``, :class:`SitePolicy`); the coordinator
never sends it and cannot change it. Every message a hospital node receives is checked against it
(:func:`refusal_for`) from what the message itself says: the experiment it carries (model,
strategy, privacy, task) and the message's own facts (its type, round number and evaluation
split). Nothing is read from the hospital's data before the check passes, so a refused message
costs no data access and no training.

A violation gives a :class:`Refusal`: the rule (``policy.max_rounds``) and why, in words that name
no path and no patient. The node answers it with a refusal reply (:mod:`medflower.client.replies`):
no arrays, ``num-examples: 0`` and the text under ``keys.REFUSAL``, which the coordinator records in
the round's ``refusals`` and carries on without the site.

Why the checks are written against the experiment, not against the coordinator's word: the
experiment is what the site's own code will execute (its model, its strategy's site half, its
DP-SGD plan), so checking it is checking what would happen. The one thing the site cannot read
from the experiment is how often it is asked; ``policy.max_rounds`` therefore also counts the
rounds the node has trained in the run itself (:func:`refusal_for`'s ``rounds_trained``), so that a
coordinator that repeats round numbers does not get more rounds than the limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medflower.config import ExperimentConfig
from medflower.config.model import ModelName
from medflower.schema import ConfigError, rng_field
from medflower.strategies.registry import METHODS, method_names

# Methods that keep a personal model at the site (trained on its data, never aggregated), which
# ``policy.allow_personal_models: false`` refuses: declared by each method (Method.personal_model).
PERSONAL_MODEL_METHODS: tuple[str, ...] = tuple(m.name for m in METHODS.values() if m.personal_model)

EVAL_SPLITS = ("val", "test")  # what a coordinator may ask a site to evaluate on (never its training split)
MESSAGE_KINDS = ("train", "evaluate", "query")  # query: the DP feature statistics (client/featurestats.py)


@dataclass(frozen=True, kw_only=True)
class SitePolicy:
    """``policy:`` in a site YAML. Every key is optional; an absent key allows what it governs.

    * ``models`` / ``strategies``: the model names (``model.name``) and aggregation methods
      (``strategy.name``) the site trains; empty = any.
    * ``require_privacy: sample``: the site takes part only in experiments with sample-level DP-SGD
      (``privacy.mode: sample``), whose budget for this site must not exceed ``max_epsilon`` /
      ``max_delta``. Client-level DP (mode ``client``) adds its noise at the coordinator, so it does
      not protect the hospital's data from the coordinator and does not satisfy the requirement.
    * ``max_rounds``: the most training rounds the site does in one run.
    * ``allow_test_evaluation``: whether the coordinator may evaluate on the site's test split.
    * ``allow_personal_models``: whether methods that keep a personal model at the site
      (:data:`PERSONAL_MODEL_METHODS`) may run.
    """

    models: tuple[ModelName, ...] = ()
    strategies: tuple[str, ...] = ()
    require_privacy: Literal["none", "sample"] = "none"
    max_epsilon: float | None = rng_field(None, min=0.0, exclusive_min=True)
    max_delta: float | None = rng_field(None, min=0.0, exclusive_min=True, max=0.1)
    max_rounds: int | None = rng_field(None, min=1)
    allow_test_evaluation: bool = True
    allow_personal_models: bool = True

    def __post_init__(self) -> None:
        unknown = [s for s in self.strategies if s not in method_names()]
        if unknown:
            raise ConfigError(
                f"policy.strategies: {unknown[0]!r} is not an aggregation method; valid choices are "
                + ", ".join(repr(n) for n in method_names())
            )
        for key in ("max_epsilon", "max_delta"):
            if getattr(self, key) is not None and self.require_privacy != "sample":
                raise ConfigError(
                    f"policy.{key}: applies to sample-level DP; set policy.require_privacy: sample with it"
                )


@dataclass(frozen=True)
class Refusal:
    """Why a site refuses a message: the rule it applies and the reason, for the coordinator to read."""

    rule: str
    why: str

    @property
    def text(self) -> str:
        return f"{self.rule}: {self.why}"


@dataclass(frozen=True, kw_only=True)
class Request:
    """What a message asks of the site, read from the message itself (nothing from the site's data)."""

    kind: str  # "train" | "evaluate" | "query" (Flower's message type, without an action)
    server_round: int
    eval_split: str = "val"
    run_id: int = 0


@dataclass(frozen=True, kw_only=True)
class NodeFacts:
    """What the node knows about itself that the policy checks depend on (none of it from the coordinator)."""

    site_name: str
    site_task: str
    has_state_dir: bool
    node_epsilon: float | None = None  # node config dp-target-epsilon (stricter budget)
    node_delta: float | None = None
    rounds_trained: int = 0  # training rounds this node already accepted in the request's run


def simulation_only_requests(exp: ExperimentConfig) -> list[str]:
    """What ``exp`` asks a site to do that only a simulated site may do (empty: nothing)."""
    found = []
    if exp.attack.kind != "none":
        sites = ", ".join(exp.attack.sites)
        found.append(f"attack.kind {exp.attack.kind!r} (simulated sites {sites} send poisoned updates)")
    return found


def _privacy_refusal(policy: SitePolicy, exp: ExperimentConfig, node: NodeFacts) -> Refusal | None:
    if policy.require_privacy == "sample" and exp.privacy.mode != "sample":
        return Refusal(
            "policy.require_privacy",
            f"this site takes part only with sample-level DP-SGD (privacy.mode 'sample'); the experiment's "
            f"privacy.mode is {exp.privacy.mode!r}",
        )
    if exp.privacy.mode != "sample":
        return None
    eps, delta = exp.privacy.site_budget(node.site_name, node_epsilon=node.node_epsilon, node_delta=node.node_delta)
    hint = f"set privacy.sites.{node.site_name}.target_{{key}} to at most {{limit:g}}"
    if policy.max_epsilon is not None and eps > policy.max_epsilon:
        return Refusal(
            "policy.max_epsilon",
            f"the experiment's budget for this site is epsilon {eps:g}, above this site's limit of "
            f"{policy.max_epsilon:g}; " + hint.format(key="epsilon", limit=policy.max_epsilon),
        )
    if policy.max_delta is not None and delta > policy.max_delta:
        return Refusal(
            "policy.max_delta",
            f"the experiment's budget for this site is delta {delta:g}, above this site's limit of "
            f"{policy.max_delta:g}; " + hint.format(key="delta", limit=policy.max_delta),
        )
    return None


def refusal_for(policy: SitePolicy, exp: ExperimentConfig, request: Request, node: NodeFacts) -> Refusal | None:
    """The first rule ``request`` (carrying ``exp``) breaks at this node, or None: the site does the work.

    The order is fixed, so a message that breaks several rules is always refused by the same one:
    the message's own shape, simulation-only sections, the task, then the policy's keys in the order
    of :class:`SitePolicy`, the state folder that DP needs, rounds, and the test split last.
    """
    if request.kind not in MESSAGE_KINDS:
        return Refusal("message", f"this site answers train, evaluate and query messages, not {request.kind!r}")
    if request.kind == "query" and exp.privacy.feature_stats_noise is None:
        return Refusal(
            "message", "this site answers a query only for the DP feature statistics (privacy.feature_stats_noise)"
        )
    if request.kind == "evaluate" and request.eval_split not in EVAL_SPLITS:
        return Refusal("message", f"evaluation split {request.eval_split!r} is not one of {', '.join(EVAL_SPLITS)}")
    requests = simulation_only_requests(exp)
    if requests:
        return Refusal(
            "simulation-only",
            "a hospital node never runs simulation-only code, and the experiment asks for "
            + "; ".join(requests)
            + "; remove that section to run it across hospitals",
        )
    if exp.task != node.site_task:
        return Refusal("task", f"the experiment is {exp.task}, this site's data are for {node.site_task}")
    if policy.models and exp.model.name not in policy.models:
        return Refusal(
            "policy.models",
            f"model {exp.model.name!r} is not one this site trains (allowed: {', '.join(policy.models)})",
        )
    if policy.strategies and exp.strategy.name not in policy.strategies:
        return Refusal(
            "policy.strategies",
            f"strategy {exp.strategy.name!r} is not one this site takes part in "
            f"(allowed: {', '.join(policy.strategies)})",
        )
    if not policy.allow_personal_models and exp.strategy.name in PERSONAL_MODEL_METHODS:
        return Refusal(
            "policy.allow_personal_models",
            f"strategy {exp.strategy.name!r} keeps a personal model at the site, which this site does not allow",
        )
    refusal = _privacy_refusal(policy, exp, node)
    if refusal is not None:
        return refusal
    if exp.privacy.mode == "sample" and not node.has_state_dir:
        return Refusal(
            "state_dir",
            "this site has no state folder for its privacy ledger, so it cannot account for DP-SGD across "
            "restarts and runs; its operator must set state_dir in the site YAML (or node config state-dir)",
        )
    if request.kind == "train" and policy.max_rounds is not None:
        if request.server_round > policy.max_rounds:
            return Refusal(
                "policy.max_rounds",
                f"round {request.server_round} exceeds this site's limit of {policy.max_rounds}",
            )
        if node.rounds_trained >= policy.max_rounds:
            return Refusal(
                "policy.max_rounds",
                f"this site has already trained {node.rounds_trained} round(s) in run {request.run_id}, "
                f"its limit of {policy.max_rounds}",
            )
    if request.kind == "evaluate" and request.eval_split == "test" and not policy.allow_test_evaluation:
        return Refusal("policy.allow_test_evaluation", "this site does not allow evaluation on its test split")
    return None
