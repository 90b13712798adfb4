"""What a method's site half plugs into: the hooks of local training, and the site runtime.

These types sit in the shared package because two layers meet here: :mod:`medflower.client`
runs local training and calls the hooks, and each method module in :mod:`medflower.strategies`
declares its site half against them, without importing the client (the server imports those
modules too, and ``server`` and ``client`` never import each other).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn


@dataclass
class LocalHooks:
    """Method-specific additions to the local objective.

    ``extra_loss(model) -> Tensor`` is added to the task loss (FedProx's proximal term, Ditto's
    regularizer); ``after_backward(model)`` may edit gradients before the step (SCAFFOLD's control
    variate correction).
    """

    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None
    after_backward: Callable[[nn.Module], None] | None = None


@dataclass
class TrainStats:
    num_examples: int  # samples seen in the last epoch (not batches)
    num_steps: int  # optimizer steps over all epochs
    loss: float  # mean task loss over the last epoch
    extra: dict[str, float] = field(default_factory=dict)


class SiteRuntime(Protocol):
    """What the hospital's ClientApp lends a site half: its training loop and its evaluation.

    Ditto trains a second (personal) model with the site's own data and loop; a site half never
    touches the data itself, so the same module serves a simulated site and a hospital.
    """

    @property
    def lr(self) -> float: ...

    @property
    def local_epochs(self) -> int: ...

    @property
    def sgd_momentum(self) -> float:
        """The local SGD's heavy-ball momentum (0 when the optimizer is not SGD): SCAFFOLD's
        control variate divides the local model change by the distance its steps could cover."""
        ...

    def train(self, model: nn.Module, *, hooks: LocalHooks, epochs: int, lr: float) -> TrainStats: ...

    def evaluate(self, model: nn.Module, split: Any) -> dict[str, float]: ...
