"""``privacy:`` — differential privacy policy.

Applied by :mod:`medflower.client.privacy` (sites) and :mod:`medflower.strategies.privacy` (coordinator).

Three modes:

* ``none`` — no DP (the default).
* ``sample`` — sample-level DP-SGD with Opacus at every site: each hospital protects each of its
  patients' images. The budget (``target_epsilon``, ``target_delta``) covers the WHOLE run at that
  site; the noise multiplier is derived from the whole planned run (rounds x local steps x sampling
  rate), and the site's accountant (its *ledger*) lives for the whole run and across restarts.
* ``client`` — client-level DP through Flower's DP strategy wrappers (each hospital's whole
  contribution is protected), accounted by Flower's RDP accountant on the coordinator.

A hospital may demand a stricter budget than the administrator: ``sites.<site name>`` here, or the
node-config keys ``dp-target-epsilon`` / ``dp-target-delta`` on its own SuperNode. Stricter means a
smaller epsilon (or delta); a larger value is never taken (the smallest of all applies).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

from medflower.config.train import TrainConfig
from medflower.schema import ConfigError, rng_field

PrivacyMode = Literal["none", "sample", "client"]
MAX_NOISE_MULTIPLIER = 1e6  # Opacus' get_noise_multiplier gives up above this sigma
DP_DEFAULT_LR = 0.01  # privacy.lr: chosen on federated validation (docs/privacy.md "Training under DP-SGD")


@dataclass(frozen=True)
class SitePrivacy:
    """A hospital's own, stricter budget (``privacy.sites.<site name>``). Unset keys inherit."""

    target_epsilon: float | None = rng_field(None, min=0.0, exclusive_min=True)
    target_delta: float | None = rng_field(None, min=0.0, exclusive_min=True, max=0.1)


@dataclass(frozen=True)
class PrivacyConfig:
    mode: PrivacyMode = "none"
    # the budget for the whole run (per site in mode 'sample'; for the federation in mode 'client')
    target_epsilon: float = rng_field(8.0, min=0.0, exclusive_min=True)
    target_delta: float = rng_field(1e-5, min=0.0, exclusive_min=True, max=0.1)
    # None: derived from the budget and the whole planned run. Set: used as is, and the budget is
    # only the ledger's cap (a site stops when its next round would exceed it).
    noise_multiplier: float | None = rng_field(None, min=0.0, exclusive_min=True)
    # --- mode 'sample' (Opacus DP-SGD at each site)
    max_grad_norm: float = rng_field(1.0, min=0.0, exclusive_min=True)  # per-sample clipping bound
    accountant: Literal["rdp", "prv"] = "rdp"
    poisson_sampling: bool = True  # False: shuffled fixed-size batches (the guarantee is then approximate)
    # the local optimizer under DP-SGD: 'sgd' (default) trains with SGD + momentum at privacy.lr, whatever
    # train.optimizer/lr say (those are tuned for noise-free gradients); 'train' uses train.* unchanged.
    # Chosen by a search on federated validation: docs/privacy.md "Training under DP-SGD"
    optimizer: Literal["sgd", "train"] = "sgd"
    lr: float = rng_field(DP_DEFAULT_LR, min=0.0, exclusive_min=True, max=10.0)  # privacy.optimizer 'sgd' only
    momentum: float = rng_field(0.9, min=0.0, max=1.0)  # privacy.optimizer 'sgd' only
    # with model.whiten_features: the head's input is standardised by feature statistics each site releases
    # under DP before round 1 (two Gaussian sums; medflower/featurestats.py), at this noise multiplier. Their cost
    # is charged to the site's ledger and DP-SGD's noise is planned around it, so the run stays within budget.
    # None: off (the synthetic whitening alone)
    feature_stats_noise: float | None = rng_field(None, min=0.0, exclusive_min=True)
    sites: dict[str, SitePrivacy] = field(default_factory=dict)
    # --- mode 'client' (Flower's DP wrappers)
    clipping: Literal["fixed", "adaptive"] = "fixed"
    clipping_side: Literal["server", "client"] = "server"
    clipping_norm: float = rng_field(1.0, min=0.0, exclusive_min=True)  # fixed norm / adaptive initial norm
    target_clipped_quantile: float = rng_field(0.5, min=0.0, max=1.0)  # adaptive only
    clip_norm_lr: float = rng_field(0.2, min=0.0, exclusive_min=True)  # adaptive only
    clipped_count_stddev: float | None = rng_field(None, min=0.0)  # adaptive only; None = Flower's default

    def __post_init__(self) -> None:
        for name, site in self.sites.items():
            if site.target_epsilon is not None and site.target_epsilon > self.target_epsilon:
                raise ConfigError(
                    f"privacy.sites.{name}.target_epsilon: {site.target_epsilon} is larger than "
                    f"privacy.target_epsilon {self.target_epsilon}; a site may only demand a stricter "
                    "(smaller) budget than the administrator"
                )
            if site.target_delta is not None and site.target_delta > self.target_delta:
                raise ConfigError(
                    f"privacy.sites.{name}.target_delta: {site.target_delta} is larger than "
                    f"privacy.target_delta {self.target_delta}; a site may only demand a stricter (smaller) delta"
                )
        if self.mode == "client" and self.accountant != "rdp":
            raise ConfigError(
                "privacy.accountant: mode 'client' is accounted by Flower's RDP accountant; "
                f"{self.accountant!r} applies to mode 'sample' only (valid here: 'rdp')"
            )
        if self.mode == "client" and self.sites:
            raise ConfigError(
                "privacy.sites: per-site budgets apply to mode 'sample'; in mode 'client' the budget "
                "belongs to the federation (set privacy.target_epsilon)"
            )
        if self.mode == "none":
            return
        budgets = [(self.target_epsilon, self.target_delta, "privacy.target_epsilon")]
        budgets += [
            (
                s.target_epsilon or self.target_epsilon,
                s.target_delta or self.target_delta,
                f"privacy.sites.{n}.target_epsilon",
            )
            for n, s in self.sites.items()
        ]
        for eps, delta, key in budgets:
            check_budget_reachable(eps, delta, self.accountant, key=key)

    def local_train(self, train: TrainConfig) -> TrainConfig:
        """The recipe a site's optimizer follows: under DP-SGD (mode 'sample', ``optimizer: sgd``) SGD with
        ``privacy.momentum`` at ``privacy.lr``; otherwise ``train`` unchanged.

        Why not ``train.*``: a recipe tuned for noise-free gradients does not suit the noise a whole-run
        budget calls for. Adam rescales every coordinate, noise included, to a step of about ``lr``; at
        1e-3..3e-3 every DP run of the validation search collapsed onto the majority class. Momentum SGD
        with a small step on the clipped, noised gradients is the DP-SGD literature's standard recipe
        (Abadi et al. 2016; De et al. 2022; Ponomareva et al. 2023, "How to DP-fy ML") and won that search
        (docs/privacy.md).
        """
        if self.mode != "sample" or self.optimizer == "train":
            return train
        return dataclasses.replace(train, optimizer="sgd", lr=self.lr, momentum=self.momentum)

    def site_budget(
        self, site_name: str, *, node_epsilon: float | None = None, node_delta: float | None = None
    ) -> tuple[float, float]:
        """(epsilon, delta) for ``site_name``: the strictest of the experiment, its ``sites`` entry and
        the hospital's node config."""
        site = self.sites.get(site_name, SitePrivacy())
        eps = [self.target_epsilon, site.target_epsilon, node_epsilon]
        deltas = [self.target_delta, site.target_delta, node_delta]
        return min(e for e in eps if e is not None), min(d for d in deltas if d is not None)


@lru_cache(maxsize=64)
def epsilon_floor(delta: float, accountant: str) -> float:
    """The smallest epsilon the accountant can certify at ``delta``, whatever the noise.

    Even with infinite noise an (epsilon, delta) conversion has a floor (for RDP it comes from the
    largest order the accountant evaluates: about 0.10 at delta=1e-5). A target below it can never
    be reached, so it is rejected when the config is loaded, before any training.
    """
    # imported here: Opacus takes seconds to import, and configs with privacy.mode 'none' never get here
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(MAX_NOISE_MULTIPLIER, 1.0, 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def check_budget_reachable(epsilon: float, delta: float, accountant: str, *, key: str) -> None:
    floor = epsilon_floor(delta, accountant)
    if not math.isfinite(epsilon) or epsilon <= floor * 1.05:
        raise ConfigError(
            f"{key}: epsilon {epsilon} at delta {delta} is impossible: no noise multiplier reaches it "
            f"(the {accountant.upper()} accountant cannot certify less than {floor:.3f} at this delta); "
            "raise the epsilon or the delta"
        )
