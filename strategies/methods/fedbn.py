"""FedBN (Li et al., ICLR 2021): normalization layers stay at each site and are never averaged.

Flower has no FedBN, so both halves are written here. Sites with different scanners differ most in
low-level intensity statistics; FedBN lets each site keep its own normalization layers
(BatchNorm's affine parameters and running statistics, or GroupNorm/InstanceNorm/LayerNorm affine
parameters) and federates the rest.

Server half (on Flower's FedAvg): train and evaluate messages name the local keys in the
ConfigRecord (``LOCAL_KEYS``); a valid reply carries every *other* array of the model (the norm
layers never leave the site); the shared arrays are averaged as in FedAvg and the global model's
norm entries are left untouched (they stay at their initial values and only serve a site that has
none of its own yet, and the server-side test evaluation). Read FedBN's per-site metrics: each
site evaluates the shared layers with its own normalization.

Site half: keeps the site's norm arrays in ``context.state`` and puts them back after loading each
global model, for training and evaluation alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from logging import INFO
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import nn

from medflower import records
from medflower.hooks import SiteRuntime, TrainStats
from medflower.schema import ConfigError
from medflower.strategies.registry import (
    Method,
    NoParams,
    ServerContext,
    SiteHalf,
    SiteUpdate,
    Spec,
    arrays_to_tensors,
    tensors_to_arrays,
)

LOCAL_KEYS = "local-keys"  # ConfigRecord list[str]: state keys that stay at the site
STATE_LOCAL = "strategy.local-arrays"  # context.state: the site's own normalization arrays

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def norm_state_keys(model: nn.Module) -> list[str]:
    """State-dict keys (parameters and buffers) of the model's normalization layers."""
    out = []
    for mod_name, mod in model.named_modules():
        if isinstance(mod, NORM_TYPES):
            prefix = f"{mod_name}." if mod_name else ""
            out += [prefix + n for n, _ in mod.named_parameters(recurse=False)]
            out += [prefix + n for n, _ in mod.named_buffers(recurse=False)]
    return out


class FedBN(FedAvg):
    """FedAvg over every array except ``local_keys``, which stay at the sites (see module doc)."""

    def __init__(self, *, local_keys: Sequence[str], **fedavg_kwargs: Any) -> None:
        if not local_keys:
            raise ValueError("local_keys is empty: FedBN needs a model with normalization layers")
        super().__init__(**fedavg_kwargs)
        self.local_keys = list(local_keys)
        self.current: ArrayRecord | None = None

    def summary(self) -> None:
        log(INFO, "\t├──> FedBN: %d normalization arrays stay at the sites", len(self.local_keys))
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        missing = [k for k in self.local_keys if k not in arrays]
        if missing:
            raise ValueError(f"FedBN: local key(s) {missing[:3]} are not in the global model")
        self.current = arrays
        config[LOCAL_KEYS] = list(self.local_keys)
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[LOCAL_KEYS] = list(self.local_keys)
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        shared, metrics = super().aggregate_train(server_round, replies)
        if shared is None:
            return None, metrics
        if self.current is None:
            raise ValueError("FedBN: configure_train must run before aggregate_train")
        merged = {k: (shared[k] if k in shared else Array(a.numpy())) for k, a in self.current.items()}
        return ArrayRecord(merged), metrics


def reply_arrays(global_spec: Spec, strategy: Any) -> dict[str, Spec]:
    """A valid reply carries the shared arrays only."""
    local = set(strategy.local_keys)
    return {strategy.arrayrecord_key: {k: v for k, v in global_spec.items() if k not in local}}


class FedBNSite(SiteHalf):
    """Restores the site's own norm layers after each global model; keeps them out of the reply."""

    def __init__(self, *, message: Message, state: RecordDict, model: nn.Module, runtime: SiteRuntime) -> None:
        super().__init__(message=message, state=state, model=model, runtime=runtime)
        self.local_keys = records.get_str_list(self.config, LOCAL_KEYS)
        if self.local_keys and STATE_LOCAL in state:
            saved = arrays_to_tensors(records.record(state, STATE_LOCAL, ArrayRecord))
            own = {k: v for k, v in saved.items() if k in self.local_keys}
            model.load_state_dict({**model.state_dict(), **own})

    def after_train(self, model: nn.Module, stats: TrainStats) -> SiteUpdate:
        update = super().after_train(model, stats)
        local = set(self.local_keys)
        if local:
            self.state[STATE_LOCAL] = tensors_to_arrays({k: v for k, v in update.state.items() if k in local})
            update.state = {k: v for k, v in update.state.items() if k not in local}
        return update


def build(ctx: ServerContext) -> FedBN:
    norm = ctx.norm_keys()
    if not norm:
        raise ConfigError("strategy.name: 'fedbn' keeps normalization layers local, but the model has none")
    return FedBN(**ctx.flower, local_keys=norm)


METHOD = Method(
    name="fedbn",
    summary="FedAvg except the normalization layers, which stay at each site",
    params=NoParams,
    build=build,
    site=FedBNSite,
    message_keys=(LOCAL_KEYS,),
    privacy={
        "none": None,
        "sample": None,
        "client": "client-level DP clips and noises the whole model update; FedBN's server half merges a partial "
        "one, which Flower's DP wrappers and accountant do not cover",
    },
    secure_aggregation=None,
    models="needs normalization layers",
    source="medflower",
    reference="Li et al., ICLR 2021",
    reply_arrays=reply_arrays,
)
