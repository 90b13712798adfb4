"""The site's half of the aggregation strategies: what Flower leaves to the client.

The coordinator's strategy says what it needs through the message (never through the site's own
config), so a site follows whichever strategy the run uses:

* FedProx — ConfigRecord ``proximal-mu`` (sent by Flower's FedProx): the local objective gets the
  proximal term ``mu/2 * ||w - w_global||^2`` (Li et al. 2020), through ``LocalHooks.extra_loss``.
* SCAFFOLD — an ArrayRecord ``scaffold-c`` (server control variate): every gradient is corrected by
  ``c - c_i`` (``LocalHooks.after_backward``); afterwards ``c_i`` is updated (option II) and kept
  in ``context.state``, and the reply carries ``scaffold-dc``. See :mod:`medflower.strategies.scaffold`.
* FedBN — ConfigRecord ``local-keys``: those arrays (normalization layers) are restored from
  ``context.state`` after loading each global model, saved after training, and never sent.
* Ditto — ConfigRecord ``ditto-lambda``: after the usual local update of the global model, the
  site trains its personal model (kept in ``context.state``) on ``loss + lam/2 ||v - w_global||^2``
  and reports its evaluations as ``personal-<metric>`` next to the global model's.

Also the SIMULATION-ONLY ``attack:`` switch (:mod:`medflower.simulation.attack`): applied to the outgoing
update only on a simulated site, ignored with a warning on a deployed node.

None of these methods exists in Flower, MONAI or Opacus in a form that plugs into our local
training loop, hence this module. Each piece is a few lines around ``medflower.client.train``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message
from torch import nn

from medflower import keys
from medflower.client.train import LocalHooks, TrainStats, make_loader, make_optimizer, train_epochs
from medflower.config import ExperimentConfig
from medflower.tasks import evaluate, inference_roi

logger = logging.getLogger(__name__)

# context.state keys (the site's persistent state); prefixed so they never clash with DP's ledger
STATE_LOCAL = "strategy.local-arrays"  # FedBN: the site's own normalization arrays
STATE_CI = "strategy.scaffold-ci"  # SCAFFOLD: the site's control variate
STATE_PERSONAL = "strategy.ditto-personal"  # Ditto: the site's personal model


def _to_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.array(t.detach().cpu().numpy(), order="C")) for k, t in tensors.items()})


def _from_record(rec: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in rec.items()}


def is_simulated(context: Context) -> bool:
    """A simulated site (partition id) rather than a hospital's node (site YAML); see client.app.load_site."""
    nc = context.node_config
    return keys.NODE_PARTITION_ID in nc and not str(nc.get(keys.NODE_SITE_CONFIG, "") or "")


@dataclass
class SiteStrategy:
    """The strategy's requests for one message, bound to the model that message loaded."""

    context: Context
    exp: ExperimentConfig
    model: nn.Module
    global_arrays: ArrayRecord
    mu: float = 0.0
    local_keys: list[str] = field(default_factory=list)
    scaffold_c: dict[str, torch.Tensor] | None = None
    scaffold_ci: dict[str, torch.Tensor] | None = None
    ditto: dict[str, float] | None = None  # lam, epochs, lr
    global_params: dict[str, torch.Tensor] = field(default_factory=dict)
    hooks: LocalHooks = field(default_factory=LocalHooks)

    # -- set-up --------------------------------------------------------------------------------

    @classmethod
    def for_message(cls, msg: Message, context: Context, exp: ExperimentConfig, model: nn.Module) -> SiteStrategy:
        """Call right after ``model.load_state_dict(global)``: restores the site's own layers."""
        cfg = msg.content[keys.CONFIG]
        self = cls(context=context, exp=exp, model=model, global_arrays=msg.content[keys.ARRAYS])
        self.mu = float(cfg.get(keys.PROXIMAL_MU, 0.0) or 0.0)
        self.local_keys = [str(k) for k in cfg.get(keys.LOCAL_KEYS, []) or []]
        if self.local_keys and STATE_LOCAL in context.state:
            saved = _from_record(context.state[STATE_LOCAL])
            model.load_state_dict({**model.state_dict(), **{k: v for k, v in saved.items() if k in self.local_keys}})
        if keys.DITTO_LAMBDA in cfg:
            self.ditto = {
                "lam": float(cfg[keys.DITTO_LAMBDA]),
                "epochs": int(cfg.get(keys.DITTO_EPOCHS, exp.train.local_epochs)),
                "lr": float(cfg.get(keys.DITTO_LR, exp.train.lr)),
            }
        if keys.SCAFFOLD_C in msg.content.array_records:
            self.scaffold_c = _from_record(msg.content[keys.SCAFFOLD_C])
            saved_ci = _from_record(context.state[STATE_CI]) if STATE_CI in context.state else {}
            self.scaffold_ci = {k: saved_ci.get(k, torch.zeros_like(c)) for k, c in self.scaffold_c.items()}
        if self.mu > 0 or self.ditto is not None or self.scaffold_c is not None:
            self.global_params = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.hooks = LocalHooks(
            extra_loss=self._proximal if self.mu > 0 else None,
            after_backward=self._scaffold_correction if self.scaffold_c is not None else None,
        )
        return self

    # -- hooks -----------------------------------------------------------------------------------

    def _proximal(self, model: nn.Module) -> torch.Tensor:
        """FedProx: ``mu/2 * ||w - w_global||^2`` over the trainable parameters."""
        return 0.5 * self.mu * proximal_term(model, self.global_params)

    def _scaffold_correction(self, model: nn.Module) -> None:
        """SCAFFOLD: gradient + c - c_i (data-independent, so it is added after backward)."""
        assert self.scaffold_c is not None and self.scaffold_ci is not None  # set with the hook
        for n, p in model.named_parameters():
            if p.grad is not None and n in self.scaffold_c:
                p.grad.add_(self.scaffold_c[n] - self.scaffold_ci[n])

    # -- after local training --------------------------------------------------------------------

    def after_train(
        self, model: nn.Module, stats: TrainStats, *, site: Any, seed: int
    ) -> tuple[ArrayRecord, dict[str, ArrayRecord], dict[str, float]]:
        """(model arrays to send, extra ArrayRecords for the reply, extra metrics)."""
        state = model.state_dict()
        extra: dict[str, ArrayRecord] = {}
        metrics: dict[str, float] = {}
        if self.local_keys:
            local = set(self.local_keys)
            self.context.state[STATE_LOCAL] = _to_record({k: v for k, v in state.items() if k in local})
            state = type(state)((k, v) for k, v in state.items() if k not in local)
        if self.scaffold_c is not None:
            extra[keys.SCAFFOLD_DC] = self._scaffold_update(model, stats)
        if self.ditto is not None:
            metrics |= self._train_personal(site, seed)
        arrays = ArrayRecord(state)
        if self.exp.attack.kind != "none" and site.name in self.exp.attack.sites:
            if is_simulated(self.context):
                from medflower.simulation.attack import poison

                arrays = poison(arrays, self.global_arrays, self.exp.attack)
            else:
                logger.warning("attack: is a simulation-only research setting; this deployed node ignores it")
        return arrays, extra, metrics

    def _scaffold_update(self, model: nn.Module, stats: TrainStats) -> ArrayRecord:
        """Option II: ``c_i+ = c_i - c + (x - y)/(K lr)``; keeps ``c_i+``, returns ``c_i+ - c_i``."""
        assert self.scaffold_c is not None and self.scaffold_ci is not None
        params = dict(model.named_parameters())
        k_lr = stats.num_steps * self.exp.train.lr
        new_ci, dc = {}, {}
        for n, c in self.scaffold_c.items():
            ci = self.scaffold_ci[n]
            if k_lr > 0:
                new_ci[n] = ci - c + (self.global_params[n] - params[n].detach()) / k_lr
            else:  # no local step (empty site): nothing learned about the drift
                new_ci[n] = ci.clone()
            dc[n] = new_ci[n] - ci
        self.context.state[STATE_CI] = _to_record(new_ci)
        return _to_record(dc)

    def _personal_model(self) -> nn.Module:
        """This site's Ditto model: saved in ``context.state``, else a copy of the global model."""
        personal = copy.deepcopy(self.model)
        personal.load_state_dict(
            {
                **personal.state_dict(),
                **{k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in self.global_arrays.items()},
            }
        )
        if STATE_PERSONAL in self.context.state:
            personal.load_state_dict(_from_record(self.context.state[STATE_PERSONAL]))
        return personal

    def _train_personal(self, site: Any, seed: int) -> dict[str, float]:
        assert self.ditto is not None
        personal = self._personal_model()
        lam, w = self.ditto["lam"], self.global_params
        hooks = LocalHooks(extra_loss=(lambda m: 0.5 * lam * proximal_term(m, w)) if lam > 0 else None)
        cfg = dataclasses.replace(self.exp.train, lr=self.ditto["lr"])
        loader = make_loader(site.train, self.exp.train.batch_size, seed + 7919)
        stats = train_epochs(
            personal,
            loader,
            make_optimizer(personal, cfg),
            epochs=int(self.ditto["epochs"]),
            task=self.exp.task,
            hooks=hooks,
        )
        self.context.state[STATE_PERSONAL] = _to_record(personal.state_dict())
        return {f"{keys.PERSONAL_PREFIX}{keys.TRAIN_LOSS}": stats.loss}

    # -- evaluation ------------------------------------------------------------------------------

    def personal_metrics(self, split: Any, split_name: str) -> dict[str, float]:
        """Ditto: the personal model's evaluation as ``personal-<split>-<metric>`` (empty otherwise).

        A site that has not trained yet reports its personal model = the global model, so that every
        site's reply has the same keys (Flower's metric aggregation requires it).
        """
        if self.ditto is None:
            return {}
        res = evaluate(
            self._personal_model(),
            split,
            task=self.exp.task,
            batch_size=self.exp.train.eval_batch_size,
            roi_size=inference_roi(self.exp),
        )
        p = keys.PERSONAL_PREFIX
        return {(f"{p}{keys.EVAL_LOSS}" if k == "loss" else f"{p}{split_name}-{k}"): v for k, v in res.items()}


def proximal_term(model: nn.Module, reference: dict[str, torch.Tensor]) -> torch.Tensor:
    """``||w - w_ref||^2`` summed over the model's trainable parameters that ``reference`` holds."""
    terms = [((p - reference[n]) ** 2).sum() for n, p in model.named_parameters() if p.requires_grad and n in reference]
    return torch.stack(terms).sum() if terms else torch.zeros(())
