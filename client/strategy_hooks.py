"""The site's half of the aggregation method, as the method's registry entry declares it.

The coordinator's experiment (in every message) names the method; its module in
:mod:`medflower.strategies.methods` declares the site half (FedProx's proximal term, SCAFFOLD's
control variates, FedBN's local layers, Ditto's personal model), which reads what it needs from the
message itself. This module binds that half to the site's own training loop and evaluation
(:class:`SiteRuntime`), so that method modules never import the client.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message
from torch import nn

from medflower.client.augment import make_augment
from medflower.client.train import make_loader, make_optimizer, train_epochs
from medflower.config import ExperimentConfig
from medflower.device import Amp, host_state, inference_amp, pin_memory
from medflower.hooks import LocalHooks, TrainStats
from medflower.strategies.registry import SiteHalf, get_method
from medflower.tasks import evaluate, inference_roi

PERSONAL_SEED_OFFSET = 7919  # a second model trained at the site shuffles its data differently


@dataclass
class SiteRuntime:
    """The site's training loop and evaluation, lent to the method's site half."""

    exp: ExperimentConfig
    site: Any = None  # the site's data (SiteData); set once the ClientApp has loaded it
    seed: int = 0
    amp: Amp = dataclasses.field(default_factory=lambda: Amp(torch.device("cpu")))  # device and precision

    @property
    def lr(self) -> float:
        return self.exp.train.lr

    @property
    def local_epochs(self) -> int:
        return self.exp.train.local_epochs

    @property
    def sgd_momentum(self) -> float:
        return self.exp.train.momentum if self.exp.train.optimizer == "sgd" else 0.0

    def train(self, model: nn.Module, *, hooks: LocalHooks, epochs: int, lr: float) -> TrainStats:
        if self.site is None:
            raise RuntimeError("the site's data is not bound to the runtime (SiteStrategy.after_train binds it)")
        loader = make_loader(
            self.site.train,
            self.exp.train.batch_size,
            self.seed + PERSONAL_SEED_OFFSET,
            pin_memory=pin_memory(self.amp.device),
        )
        optimizer = make_optimizer(model, dataclasses.replace(self.exp.train, lr=lr))
        return train_epochs(
            model,
            loader,
            optimizer,
            epochs=epochs,
            task=self.exp.task,
            hooks=hooks,
            augment=make_augment(self.exp.train.augment, seed=self.seed + PERSONAL_SEED_OFFSET),
            amp=self.amp,
            multiplicity=self.exp.train.augment_multiplicity,
        )

    def evaluate(self, model: nn.Module, split: Any) -> dict[str, float]:
        return evaluate(
            model,
            split,
            task=self.exp.task,
            batch_size=self.exp.train.eval_batch_size,
            roi_size=inference_roi(self.exp),
            amp=inference_amp(self.amp.device, self.amp.precision),
        )


class SiteStrategy:
    """The method's site half for one message, bound to the model that message loaded."""

    def __init__(self, half: SiteHalf, runtime: SiteRuntime) -> None:
        self.half = half
        self.runtime = runtime
        self.hooks = half.hooks()

    @classmethod
    def for_message(
        cls, msg: Message, context: Context, exp: ExperimentConfig, model: nn.Module, amp: Amp | None = None
    ) -> SiteStrategy:
        """Call right after ``model.load_state_dict(global)`` and ``model.to(amp.device)``: the half may
        restore the site's own layers and keeps its tensors where the model is."""
        runtime = SiteRuntime(exp=exp, amp=amp or Amp(torch.device("cpu")))
        half = get_method(exp.strategy.name).site(message=msg, state=context.state, model=model, runtime=runtime)
        return cls(half, runtime)

    def after_train(
        self, model: nn.Module, stats: TrainStats, *, site: Any, seed: int
    ) -> tuple[ArrayRecord, dict[str, ArrayRecord], dict[str, float]]:
        """(model arrays to send, extra ArrayRecords for the reply, extra metrics).

        The model arrays are float32 CPU arrays whatever the device and precision (:func:`host_state`).
        """
        self.runtime.site, self.runtime.seed = site, seed
        update = self.half.after_train(model, stats)
        return ArrayRecord(host_state(update.state)), update.records, update.metrics

    def personal_metrics(self, split: Any, split_name: str) -> dict[str, float]:
        """Metrics the method adds to an evaluation reply (Ditto's personal model)."""
        return self.half.evaluation_metrics(split, split_name)
