"""Ditto (Li et al., ICML 2021): a personal model per site, regularized toward the global one.

Flower has no personalized strategy, so both halves are written here. Ditto's server is FedAvg's
(the global model is trained and averaged as usual) and only tells the sites Ditto's settings
(ConfigRecord ``DITTO_*``) in both train and evaluate messages. Each site additionally keeps a
personal model ``v`` in its persistent ``context.state`` and, every round, trains it on
``task loss + lam/2 * ||v - w_global||^2``. Sites report both models' evaluations:
``val-accuracy`` (global) and ``personal-val-accuracy`` (personal), likewise for the test split,
so the summary shows global and personal metrics per site. ``lam = 0`` gives purely local models;
a large ``lam`` pulls them onto the global model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from medflower import keys, records
from medflower.hooks import LocalHooks, SiteRuntime, TrainStats
from medflower.schema import rng_field
from medflower.strategies.methods.fedprox import frozen_parameters, proximal_term
from medflower.strategies.registry import (
    Method,
    ServerContext,
    SiteHalf,
    SiteUpdate,
    arrays_to_tensors,
    tensors_to_arrays,
)

DITTO_LAMBDA = "ditto-lambda"  # ConfigRecord float: Ditto's pull toward the global model
DITTO_EPOCHS = "ditto-personal-epochs"  # ConfigRecord int: epochs on the personal model
DITTO_LR = "ditto-personal-lr"  # ConfigRecord float: personal model's learning rate
PERSONAL_PREFIX = "personal-"  # MetricRecord prefix: metrics of a site's personal model
STATE_PERSONAL = "strategy.ditto-personal"  # context.state: the site's personal model


@dataclass(frozen=True)
class DittoParams:
    lam: float = rng_field(0.1, min=0.0)  # λ: pull of the personal model toward the global one
    personal_epochs: int | None = rng_field(None, min=1)  # None = train.local_epochs
    personal_lr: float | None = rng_field(None, min=0.0, exclusive_min=True)  # None = train.lr


class Ditto(FedAvg):
    """FedAvg that asks sites to train and report a personal model (see module doc)."""

    def __init__(self, *, lam: float, personal_epochs: int, personal_lr: float, **fedavg_kwargs: Any) -> None:
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if personal_epochs < 1:
            raise ValueError(f"personal_epochs must be >= 1, got {personal_epochs}")
        if not personal_lr > 0:
            raise ValueError(f"personal_lr must be > 0, got {personal_lr}")
        super().__init__(**fedavg_kwargs)
        self.lam, self.personal_epochs, self.personal_lr = lam, personal_epochs, personal_lr

    def summary(self) -> None:
        log(
            INFO,
            "\t├──> Ditto: lambda %s, %d personal epoch(s) at lr %s",
            self.lam,
            self.personal_epochs,
            self.personal_lr,
        )
        super().summary()

    def _tell(self, config: ConfigRecord) -> None:
        config[DITTO_LAMBDA] = float(self.lam)
        config[DITTO_EPOCHS] = int(self.personal_epochs)
        config[DITTO_LR] = float(self.personal_lr)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._tell(config)
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._tell(config)
        return super().configure_evaluate(server_round, arrays, config, grid)


class DittoSite(SiteHalf):
    """Trains and evaluates the site's personal model next to the global one."""

    def __init__(self, *, message: Message, state: RecordDict, model: nn.Module, runtime: SiteRuntime) -> None:
        super().__init__(message=message, state=state, model=model, runtime=runtime)
        self.lam = records.get_float(self.config, DITTO_LAMBDA, 0.0)
        self.epochs = records.get_int(self.config, DITTO_EPOCHS, runtime.local_epochs)
        self.lr = records.get_float(self.config, DITTO_LR, runtime.lr)
        self.reference = frozen_parameters(model)  # the global model, before local training

    def personal_model(self) -> nn.Module:
        """This site's personal model: saved in ``context.state``, else a copy of the global model."""
        personal = copy.deepcopy(self.model)
        personal.load_state_dict({**personal.state_dict(), **arrays_to_tensors(self.global_arrays)})
        if STATE_PERSONAL in self.state:
            personal.load_state_dict(arrays_to_tensors(records.record(self.state, STATE_PERSONAL, ArrayRecord)))
        return personal

    def after_train(self, model: nn.Module, stats: TrainStats) -> SiteUpdate:
        update = super().after_train(model, stats)
        personal = self.personal_model()
        lam, w = self.lam, self.reference
        hooks = LocalHooks(extra_loss=(lambda m: 0.5 * lam * proximal_term(m, w)) if lam > 0 else None)
        p_stats = self.runtime.train(personal, hooks=hooks, epochs=self.epochs, lr=self.lr)
        self.state[STATE_PERSONAL] = tensors_to_arrays(personal.state_dict())
        update.metrics[f"{PERSONAL_PREFIX}{keys.TRAIN_LOSS}"] = p_stats.loss
        return update

    def evaluation_metrics(self, split: Any, split_name: str) -> dict[str, float]:
        """The personal model's evaluation as ``personal-<split>-<metric>``.

        A site that has not trained yet reports its personal model = the global model, so that every
        site's reply has the same keys (Flower's metric aggregation requires it).
        """
        res = self.runtime.evaluate(self.personal_model(), split)
        p = PERSONAL_PREFIX
        return {(f"{p}{keys.EVAL_LOSS}" if k == "loss" else f"{p}{split_name}-{k}"): v for k, v in res.items()}


def build(ctx: ServerContext) -> Ditto:
    p: DittoParams = ctx.params
    return Ditto(
        **ctx.flower,
        lam=p.lam,
        personal_epochs=p.personal_epochs or ctx.local_epochs,
        personal_lr=p.personal_lr or ctx.train_lr,
    )


METHOD = Method(
    name="ditto",
    summary="FedAvg plus a personal model at each site, pulled toward the global one",
    params=DittoParams,
    build=build,
    site=DittoSite,
    message_keys=(DITTO_LAMBDA, DITTO_EPOCHS, DITTO_LR),
    privacy={
        "none": None,
        "sample": "each site trains its personal model outside DP-SGD, so the personal metrics it reports are not "
        "covered by its privacy ledger",
        "client": None,
    },
    secure_aggregation=None,
    personal_model=True,
    source="medflower",
    reference="Li et al., ICML 2021",
)
