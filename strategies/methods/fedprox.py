"""FedProx (Li et al., MLSys 2020): FedAvg plus a proximal term in every site's local objective.

Server half: Flower's ``FedProx`` (it puts ``proximal-mu`` in every train message). Site half
(Flower leaves the client to the user): ``mu/2 * ||w - w_global||^2`` is added to the task loss.
Flower's default ``proximal_mu=0`` makes it FedAvg, so medflower's default is 0.01.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import Message, RecordDict
from flwr.serverapp import strategy as fl
from torch import nn

from medflower import records
from medflower.hooks import LocalHooks, SiteRuntime
from medflower.schema import rng_field
from medflower.strategies.registry import Method, ServerContext, SiteHalf

PROXIMAL_MU = "proximal-mu"  # ConfigRecord float in train messages (Flower's FedProx sends it under this key)


@dataclass(frozen=True)
class FedProxParams:
    proximal_mu: float = rng_field(0.01, min=0.0)


def proximal_term(model: nn.Module, reference: dict[str, torch.Tensor]) -> torch.Tensor:
    """``||w - w_ref||^2`` summed over the model's trainable parameters that ``reference`` holds."""
    terms = [((p - reference[n]) ** 2).sum() for n, p in model.named_parameters() if p.requires_grad and n in reference]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def frozen_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the model's parameters (the global model a proximal term pulls toward)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class FedProxSite(SiteHalf):
    def __init__(self, *, message: Message, state: RecordDict, model: nn.Module, runtime: SiteRuntime) -> None:
        super().__init__(message=message, state=state, model=model, runtime=runtime)
        self.mu = records.get_float(self.config, PROXIMAL_MU, 0.0)
        self.reference = frozen_parameters(model) if self.mu > 0 else {}

    def hooks(self) -> LocalHooks:
        if self.mu <= 0:
            return LocalHooks()
        return LocalHooks(extra_loss=lambda m: 0.5 * self.mu * proximal_term(m, self.reference))


def build(ctx: ServerContext) -> Any:
    return fl.FedProx(**ctx.flower, proximal_mu=ctx.params.proximal_mu)


METHOD = Method(
    name="fedprox",
    summary="FedAvg plus a proximal term that keeps local models near the global one",
    params=FedProxParams,
    build=build,
    site=FedProxSite,
    message_keys=(PROXIMAL_MU,),
    privacy={
        "none": None,
        "sample": "its proximal term's gradient is not per-sample, and Opacus' DP optimizer would drop it "
        "(it steps on clipped per-sample gradients only); use privacy.mode 'client'",
        "client": None,
    },
    secure_aggregation=None,
    reference="Li et al., MLSys 2020",
)
