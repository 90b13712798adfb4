"""Ditto (Li et al., ICML 2021): a personal model per site, regularized toward the global one.

Flower has no personalized strategy. Ditto's server is FedAvg's (the global model is trained and
averaged as usual); each site additionally keeps a personal model ``v`` in its persistent
``context.state`` and, every round, trains it on ``task loss + lam/2 * ||v - w_global||^2`` (the
client half, :mod:`medflower.client.strategy_hooks`). Sites report both models' evaluations: ``val-accuracy``
(global) and ``personal-val-accuracy`` (personal), likewise for the test split, so the summary
shows global and personal metrics per site. ``lam = 0`` gives purely local models; a large ``lam``
pulls them onto the global model.

This module only tells the sites Ditto's settings (ConfigRecord ``keys.DITTO_*``), in both train and
evaluate messages.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from medflower import keys


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
        config[keys.DITTO_LAMBDA] = float(self.lam)
        config[keys.DITTO_EPOCHS] = int(self.personal_epochs)
        config[keys.DITTO_LR] = float(self.personal_lr)

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
