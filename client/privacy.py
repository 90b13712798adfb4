"""Differential privacy at a hospital: DP-SGD with a privacy ledger that is honest across rounds, restarts and runs.

What goes wrong elsewhere, and what this module does instead:

* Flower's Opacus example builds a new ``PrivacyEngine`` every round, so the epsilon it reports
  covers one round. Here the site's accountant (its *ledger*, :class:`PrivacyLedger`) lives in
  Flower's persistent ``context.state`` and in a file in the site's state folder (node config
  ``state-dir`` or the site YAML's ``state_dir``: :mod:`medflower.client.state`), one file per data
  set, so that it continues across node restarts *and* across runs: epsilon accumulates for the
  same data set, whatever run spends it. Each round's ``PrivacyEngine`` is handed that same
  accountant object, so Opacus steps the whole history.
* The noise multiplier is derived from the whole planned run: ``train.rounds`` x local steps per
  round at the Poisson sampling rate (:func:`plan_noise_multiplier`, Opacus'
  ``get_noise_multiplier``), not from one round.
* Before a round, the site projects the epsilon after it. If that exceeds the site's budget (the
  strictest of the experiment's, the experiment's ``privacy.sites.<name>`` entry and the hospital's
  node config ``dp-target-epsilon``), it refuses to train and says so in its reply
  (``dp-budget-exhausted: 1``, no weights); :mod:`medflower.strategies.privacy` logs it and aggregates the
  others. A site never exceeds its budget silently.
* The ledger is written *before* training (write-ahead): a node that crashes mid-round is charged
  for that whole round when it restarts. Steps the loop skips (an empty Poisson batch) are charged
  too. Both err on the side of reporting more epsilon, never less.
* Noise and Poisson sampling draw from generators seeded by the operating system, not from the
  experiment's seed: a coordinator that knows the config must not be able to regenerate the noise.

:func:`client_dp_mod` applies Flower's client-side clipping mods for client-level DP (mode
``client`` with ``clipping_side: client``). Nothing here re-implements Opacus or Flower.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import secrets
import warnings
from dataclasses import dataclass
from functools import lru_cache
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.logger import log
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from torch import nn
from torch.utils.data import DataLoader

from medflower import keys
from medflower.client.state import LedgerPlace
from medflower.client.train import LocalHooks, TrainStats
from medflower.config import ExperimentConfig
from medflower.config.privacy import MAX_NOISE_MULTIPLIER
from medflower.fileio import atomic_write_text
from medflower.schema import ConfigError
from medflower.strategies.registry import model_device

LEDGER_STATE_KEY = "dp-ledger"  # context.state ConfigRecord holding the ledger as JSON
LEDGER_FORMAT = 1

# Opacus is imported inside the functions that use it, not at the top: it costs seconds, and the
# ClientApp (a new process for every message on a SuperNode) imports this module in every mode,
# while only privacy.mode 'sample' needs Opacus.


def _quiet_accountant(mechanism: str):
    from opacus.accountants import create_accountant  # here: see the note above

    return create_accountant(mechanism=mechanism)


def _epsilon_of(mechanism: str, history: list[tuple[float, float, int]], delta: float) -> float:
    if not history:
        return 0.0
    acc = _quiet_accountant(mechanism)
    acc.history = [tuple(h) for h in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def _add_steps(history: list[tuple[float, float, int]], sigma: float, q: float, steps: int) -> None:
    """Append ``steps`` at (sigma, q), merged into the last entry like Opacus' accountants do."""
    if steps <= 0:
        return
    if history and history[-1][0] == sigma and history[-1][1] == q:
        history[-1] = (sigma, q, int(history[-1][2]) + steps)
    else:
        history.append((sigma, q, steps))


@lru_cache(maxsize=128)
def plan_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: str,
    before: tuple[tuple[float, float, int], ...] = (),
) -> float:
    """The noise multiplier that spends exactly the budget over ``total_steps`` (the whole run), after the
    releases in ``before`` (accountant history entries: the feature statistics, medflower/featurestats.py)."""
    if before:
        return _plan_after(target_epsilon, target_delta, sample_rate, total_steps, accountant, before)
    from opacus.accountants.utils import get_noise_multiplier  # here: see the note at the top

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=target_delta,
                    sample_rate=sample_rate,
                    steps=total_steps,
                    accountant=accountant,
                )
            )
        except ValueError as err:
            raise ConfigError(
                f"privacy.target_epsilon: {target_epsilon} at delta {target_delta} cannot be reached over "
                f"{total_steps} DP-SGD steps at sampling rate {sample_rate:.4g} by any noise multiplier "
                f"({err}); raise the epsilon, or lower train.rounds / train.local_epochs"
            ) from err


def _plan_after(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: str,
    before: tuple[tuple[float, float, int], ...],
) -> float:
    """Bisection for the smallest noise multiplier whose ``total_steps`` after ``before`` stay within the budget
    (Opacus' ``get_noise_multiplier`` knows no earlier history). The result never exceeds the target."""

    def eps(sigma: float) -> float:
        history = list(before)
        _add_steps(history, sigma, sample_rate, total_steps)
        return _epsilon_of(accountant, history, target_delta)

    if eps(MAX_NOISE_MULTIPLIER) > target_epsilon:
        spent = _epsilon_of(accountant, list(before), target_delta)
        raise ConfigError(
            f"privacy.feature_stats_noise: the feature statistics alone spend epsilon {spent:.3f} at delta "
            f"{target_delta}, leaving DP-SGD nothing of {target_epsilon}; raise privacy.feature_stats_noise"
        )
    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, hi * 2
    while hi - lo > 1e-4 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if eps(mid) > target_epsilon else (lo, mid)
    return hi


def feature_stats_history(exp: ExperimentConfig) -> tuple[tuple[float, float, int], ...]:
    """The ledger entries the run's feature statistics charge before round 1 (none when off): two Gaussian
    releases of the whole training set (sampling rate 1), at ``privacy.feature_stats_noise``."""
    sigma = exp.privacy.feature_stats_noise
    return () if sigma is None else ((float(sigma), 1.0, 2),)


class PrivacyLedger:
    """A data set's privacy accountant over every run, with what was charged in which round (and run).

    ``accountant`` is an Opacus accountant (``rdp`` or ``prv``); its ``state_dict()`` /
    ``load_state_dict()`` carry the history, and :meth:`save` / :meth:`load` put it in a file.
    """

    def __init__(self, *, site: str, mechanism: str, data_key: str = "") -> None:
        self.site = site
        self.mechanism = mechanism
        self.data_key = data_key  # which data set it accounts for (medflower.client.state.data_key)
        self.accountant = _quiet_accountant(mechanism)
        self.rounds: list[dict[str, Any]] = []  # {"round", "steps", "noise_multiplier", "sample_rate"}
        self.pending: dict[str, Any] | None = None  # write-ahead record of a round in progress

    # ---- what was spent
    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [(float(s), float(q), int(n)) for s, q, n in self.accountant.history]

    @property
    def steps(self) -> int:
        return sum(int(h[2]) for h in self.accountant.history)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before the first step)."""
        return _epsilon_of(self.mechanism, self.history, delta)

    def projected_epsilon(self, delta: float, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon after ``steps`` more steps at (noise_multiplier, sample_rate); the ledger is unchanged."""
        history = self.history
        _add_steps(history, noise_multiplier, sample_rate, steps)
        return _epsilon_of(self.mechanism, history, delta)

    # ---- write-ahead charging around a round
    def begin(
        self,
        *,
        server_round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        run_id: int | None = None,
        delta: float | None = None,
    ) -> None:
        """Charge a round before it trains (write-ahead); ``run_id`` and ``delta`` are kept when given."""
        self.settle_pending()
        self.pending = {
            "round": server_round,
            "noise_multiplier": noise_multiplier,
            "sample_rate": sample_rate,
            "steps": steps,
            "steps_before": self.steps,
        }
        if run_id is not None:
            self.pending["run_id"] = run_id
        if delta is not None:
            self.pending["delta"] = delta

    def commit(self) -> None:
        """Close the pending round; steps Opacus did not take (empty batches) are charged anyway."""
        if self.pending is None:
            return
        p, self.pending = self.pending, None
        taken = self.steps - int(p["steps_before"])
        if taken < p["steps"]:
            history = self.history
            _add_steps(history, p["noise_multiplier"], p["sample_rate"], p["steps"] - taken)
            self.accountant.history = history
        self.rounds.append(
            {
                "round": p["round"],
                "steps": max(taken, p["steps"]),
                "noise_multiplier": p["noise_multiplier"],
                "sample_rate": p["sample_rate"],
            }
            | {k: p[k] for k in ("run_id", "delta") if k in p}
        )

    def settle_pending(self) -> None:
        """A round that began but never committed (crash) is charged in full."""
        if self.pending is not None:
            self.pending["steps_before"] = min(int(self.pending["steps_before"]), self.steps)
            self.commit()

    @property
    def charged_steps(self) -> int:
        """Steps including a pending round (what :meth:`settle_pending` would make of it)."""
        extra = 0
        if self.pending is not None:
            extra = max(0, int(self.pending["steps"]) - (self.steps - int(self.pending["steps_before"])))
        return self.steps + extra

    # ---- persistence
    def state_dict(self) -> dict[str, Any]:
        acc = self.accountant.state_dict()
        return {
            "format": LEDGER_FORMAT,
            "site": self.site,
            **({"data_key": self.data_key} if self.data_key else {}),
            "mechanism": acc["mechanism"],
            "history": [list(h) for h in acc["history"]],
            "rounds": copy.deepcopy(self.rounds),
            "pending": copy.deepcopy(self.pending),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != LEDGER_FORMAT:
            raise ValueError(
                f"privacy ledger of site {self.site!r}: format {state.get('format')!r} is not "
                f"supported (expected {LEDGER_FORMAT})"
            )
        if state.get("site") != self.site:
            raise ValueError(f"privacy ledger: it belongs to site {state.get('site')!r}, not {self.site!r}")
        if self.data_key and state.get("data_key", self.data_key) != self.data_key:
            raise ValueError(
                f"privacy ledger of site {self.site!r}: it accounts for data set {str(state.get('data_key'))[:16]}, "
                f"not {self.data_key[:16]}"
            )
        try:
            self.accountant.load_state_dict(
                {
                    "mechanism": state.get("mechanism"),
                    "history": [(float(s), float(q), int(n)) for s, q, n in state["history"]],
                }
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"privacy ledger of site {self.site!r}: malformed history ({err})") from err
        except ValueError as err:
            raise ValueError(
                f"privacy ledger of site {self.site!r} was kept with the {state.get('mechanism')!r} accountant "
                f"but privacy.accountant is {self.mechanism!r}: {err}"
            ) from err
        self.rounds = list(state.get("rounds", []))
        self.pending = state.get("pending")

    def to_json(self) -> str:
        return json.dumps(self.state_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, site: str, mechanism: str, data_key: str = "") -> PrivacyLedger:
        ledger = cls(site=site, mechanism=mechanism, data_key=data_key)
        ledger.load_state_dict(json.loads(text))
        return ledger

    def save(self, path: str | Path) -> None:
        """Atomically write the ledger (a crash never leaves half a ledger)."""
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path, *, site: str, mechanism: str, data_key: str = "") -> PrivacyLedger:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ValueError(f"privacy ledger {path}: cannot be read: {err}") from err
        try:
            return cls.from_json(text, site=site, mechanism=mechanism, data_key=data_key)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"privacy ledger {path}: not valid JSON ({err}); refusing to start a new ledger over it"
            ) from err


def _state_slot(place: LedgerPlace | None) -> str:
    return place.data_key if place is not None and place.data_key else "json"


def load_ledger(context: Context, *, site: str, mechanism: str, place: LedgerPlace | None = None) -> PrivacyLedger:
    """The data set's ledger: from ``context.state`` or its file (``place.path``), whichever has charged more."""
    key = place.data_key if place is not None else ""
    found = []
    slot = _state_slot(place)
    if LEDGER_STATE_KEY in context.state and slot in context.state.config_records[LEDGER_STATE_KEY]:
        found.append(
            PrivacyLedger.from_json(
                str(context.state.config_records[LEDGER_STATE_KEY][slot]), site=site, mechanism=mechanism, data_key=key
            )
        )
    if place is not None and place.path is not None and place.path.is_file():
        found.append(PrivacyLedger.load(place.path, site=site, mechanism=mechanism, data_key=key))
    ledger = (
        max(found, key=lambda led: led.charged_steps)
        if found
        else PrivacyLedger(site=site, mechanism=mechanism, data_key=key)
    )
    ledger.settle_pending()
    return ledger


def store_ledger(context: Context, ledger: PrivacyLedger, place: LedgerPlace | None = None) -> None:
    rec = context.state.config_records.get(LEDGER_STATE_KEY) or ConfigRecord()
    rec[_state_slot(place)] = ledger.to_json()
    context.state[LEDGER_STATE_KEY] = rec
    if place is not None and place.path is not None:
        ledger.save(place.path)


def ledger_epsilon(path: Path, *, delta: float) -> float | None:
    """Epsilon a ledger file has charged at ``delta`` (a pending round counted); None when there is no file.

    The audit log's ``epsilon_before``: read from the file before a message is handled.
    """
    if not path.is_file():
        return None
    raw = json.loads(path.read_text(encoding="utf-8"))
    ledger = PrivacyLedger.from_json(json.dumps(raw), site=str(raw.get("site")), mechanism=str(raw.get("mechanism")))
    ledger.settle_pending()
    return ledger.epsilon(delta)


def node_float(context: Context, key: str) -> float | None:
    """A positive number from the node config (None when unset); anything else names the key."""
    value = context.node_config.get(key)
    if value is None or value == "":
        return None
    try:
        out = float(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"node config {key}: expected a number, got {value!r}") from err
    if not out > 0:
        raise ConfigError(f"node config {key}: must be > 0, got {out}")
    return out


@dataclass(frozen=True)
class SitePlan:
    """A site's DP-SGD plan for the run, derived from its data size and the experiment."""

    target_epsilon: float
    target_delta: float
    noise_multiplier: float
    sample_rate: float
    steps_per_epoch: int
    steps_per_round: int
    planned_steps: int


def site_plan(
    exp: ExperimentConfig,
    *,
    site: str,
    num_train: int,
    node_epsilon: float | None = None,
    node_delta: float | None = None,
) -> SitePlan:
    """Budget, sampling rate and noise multiplier of ``site`` for the whole planned run."""
    p = exp.privacy
    if num_train <= 0:
        raise ValueError(f"site {site!r} has no training samples; it cannot train with DP-SGD")
    if getattr(exp.data, "patch_size", None) is not None or getattr(exp.data, "slabs", 1) > 1:
        raise ConfigError(
            "data.patch_size / data.slabs: sample-level DP protects one training sample, and these cut each "
            "image into several; the guarantee would cover a patch, not an image. Remove them (train on whole "
            "images) or use privacy.mode 'client'"
        )
    eps, delta = p.site_budget(site, node_epsilon=node_epsilon, node_delta=node_delta)
    if delta >= 1.0 / num_train:
        raise ConfigError(
            f"privacy.target_delta: {delta} is not below 1/n = {1.0 / num_train:.3g} for site {site!r} "
            f"({num_train} training samples); a delta that large allows releasing a whole record — lower it"
        )
    steps_per_epoch = math.ceil(num_train / exp.train.batch_size)  # len() of the site's DataLoader
    q = 1.0 / steps_per_epoch  # Opacus' convention: expected batch = num_train / steps_per_epoch
    steps_round = exp.train.local_epochs * steps_per_epoch
    planned = exp.train.rounds * steps_round
    plan = functools.partial(
        plan_noise_multiplier,
        target_epsilon=eps,
        target_delta=delta,
        sample_rate=q,
        total_steps=planned,
        accountant=p.accountant,
    )
    try:
        sigma = p.noise_multiplier or plan(before=feature_stats_history(exp))
    except ConfigError:
        if not feature_stats_history(exp):
            raise
        # the statistics alone exceed this site's (stricter) budget: it refused to release them
        # (client/featurestats.py), so its DP-SGD gets the whole budget
        sigma = plan(before=())
    return SitePlan(eps, delta, sigma, q, steps_per_epoch, steps_round, planned)


def _secret_generator(device: torch.device | None = None) -> torch.Generator:
    """An OS-seeded generator on ``device``: Opacus draws the noise where the gradients are, with this
    generator, and a CPU generator cannot draw on a GPU (Opacus leaves that transfer to the caller)."""
    return torch.Generator(device=device or torch.device("cpu")).manual_seed(secrets.randbits(63))


class RoundPrivacy:
    """What ``medflower.client.app.train`` calls each round: start → (refusal | wrap → train → finish).

    With ``privacy.mode`` ``none`` or ``client`` it is a pass-through (client-level DP is the
    coordinator's: :mod:`medflower.strategies.privacy`).
    """

    def __init__(self, *, exp: ExperimentConfig, context: Context, site: str, place: LedgerPlace | None = None) -> None:
        self.exp, self.context, self.site, self.place = exp, context, site, place
        self.plan: SitePlan | None = None
        self.ledger: PrivacyLedger | None = None
        self.refusal: dict[str, float | int] | None = None
        self._gsm: Any = None

    @classmethod
    def start(
        cls,
        exp: ExperimentConfig,
        context: Context,
        *,
        site: str,
        num_train: int,
        server_round: int,
        place: LedgerPlace | None = None,
    ) -> RoundPrivacy:
        """Plan the round and charge it to the ledger at ``place`` (the data set's file; None: memory only)."""
        rp = cls(exp=exp, context=context, site=site, place=place)
        if exp.privacy.mode != "sample":
            return rp
        node_eps = node_float(context, keys.NODE_DP_TARGET_EPSILON)
        node_delta = node_float(context, keys.NODE_DP_TARGET_DELTA)
        if node_eps is not None and node_eps > exp.privacy.target_epsilon:
            log(
                WARNING,
                "site %s: node config %s=%s is larger than the experiment's %s; a site may only be "
                "stricter, so %s applies",
                site,
                keys.NODE_DP_TARGET_EPSILON,
                node_eps,
                exp.privacy.target_epsilon,
                exp.privacy.target_epsilon,
            )
        rp.plan = plan = site_plan(exp, site=site, num_train=num_train, node_epsilon=node_eps, node_delta=node_delta)
        rp.ledger = ledger = load_ledger(context, site=site, mechanism=exp.privacy.accountant, place=place)
        after = ledger.projected_epsilon(
            plan.target_delta,
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=plan.steps_per_round,
        )
        if after > plan.target_epsilon:
            spent = ledger.epsilon(plan.target_delta)
            log(
                WARNING,
                "site %s refuses to train in round %d: its privacy budget is exhausted (epsilon %.4f of "
                "%.4f spent at delta %g; this round would reach %.4f)",
                site,
                server_round,
                spent,
                plan.target_epsilon,
                plan.target_delta,
                after,
            )
            rp.refusal = {keys.NUM_EXAMPLES: 0, **rp._metrics(spent, after, exhausted=1)}
            store_ledger(context, ledger, place)  # a settled crash charge must be kept
            return rp
        ledger.begin(
            server_round=server_round,
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=plan.steps_per_round,
            run_id=int(context.run_id),
            delta=plan.target_delta,
        )
        store_ledger(context, ledger, place)  # write-ahead: charged even if this process dies mid-round
        return rp

    def _metrics(self, spent: float, after: float, *, exhausted: int) -> dict[str, float | int]:
        plan, ledger = self.plan, self.ledger
        if plan is None or ledger is None:
            raise RuntimeError("DP metrics exist only in privacy.mode 'sample'")
        return {
            keys.DP_EPSILON: spent,
            keys.DP_DELTA: plan.target_delta,
            keys.DP_TARGET_EPSILON: plan.target_epsilon,
            keys.DP_EPSILON_NEXT: after,
            keys.DP_NOISE_MULTIPLIER: plan.noise_multiplier,
            keys.DP_STEPS: ledger.steps,
            keys.DP_EXHAUSTED: exhausted,
        }

    def wrap(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, hooks: LocalHooks | None = None
    ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
        """Opacus' DP model/optimizer/loader, stepping the run-long ledger (identity unless mode 'sample')."""
        if self.plan is None:
            return model, optimizer, loader
        if hooks is not None and (hooks.extra_loss is not None or hooks.after_backward is not None):
            raise ConfigError(
                f"privacy.mode 'sample' cannot be combined with strategy {self.exp.strategy.name!r}: it edits the "
                "local loss or gradients, which Opacus' DP optimizer would overwrite (use privacy.mode 'client')"
            )
        from opacus import PrivacyEngine  # here: see the note at the top
        from opacus.data_loader import DPDataLoader

        plan, ledger = self.plan, self.ledger
        if ledger is None:
            raise RuntimeError("RoundPrivacy.wrap called without a ledger (use RoundPrivacy.start)")
        if len(loader) != plan.steps_per_epoch:
            raise RuntimeError(
                f"DP plan expects {plan.steps_per_epoch} batches per epoch, the loader has {len(loader)}"
            )
        if self.exp.privacy.poisson_sampling:
            loader = DPDataLoader(loader.dataset, sample_rate=plan.sample_rate, generator=_secret_generator())
            loader.batch_sampler.steps = plan.steps_per_epoch  # type: ignore[union-attr]  # Opacus rounds 1/(1/k) down
        # Opacus' hooks on the first layer (inputs need no grad) make torch warn on every backward
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "secure RNG turned off": we pass an OS-seeded generator
            engine = PrivacyEngine(accountant=self.exp.privacy.accountant)
            engine.accountant = ledger.accountant  # the whole run's history, not a fresh one per round
            gsm, dp_opt, dp_loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=self.exp.privacy.max_grad_norm,
                poisson_sampling=False,
                noise_generator=_secret_generator(model_device(model)),  # on the model's device
            )
        if self.exp.privacy.poisson_sampling:
            gsm.forbid_grad_accumulation()
        self._gsm = gsm
        return gsm, dp_opt, dp_loader

    def finish(self, stats: TrainStats | None = None) -> dict[str, float | int]:
        """Commit the round to the ledger; the metrics every reply of this mode carries."""
        if self.plan is None or self.ledger is None:
            return {}
        if self._gsm is not None:
            self._gsm._close()  # remove Opacus' hooks and per-sample buffers from the model
            self._gsm = None
        ledger, plan = self.ledger, self.plan
        ledger.commit()
        store_ledger(self.context, ledger, self.place)
        spent = ledger.epsilon(plan.target_delta)
        after = ledger.projected_epsilon(
            plan.target_delta,
            noise_multiplier=plan.noise_multiplier,
            sample_rate=plan.sample_rate,
            steps=plan.steps_per_round,
        )
        log(
            INFO,
            "site %s: DP ledger epsilon %.4f of %.4f spent (delta %g) after %d steps; noise multiplier %.4f",
            self.site,
            spent,
            plan.target_epsilon,
            plan.target_delta,
            ledger.steps,
            plan.noise_multiplier,
        )
        return self._metrics(spent, after, exhausted=0)


def client_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's client-side clipping mod, when the coordinator asks for it (mode ``client``, side ``client``).

    Flower's ``fixedclipping_mod`` / ``adaptiveclipping_mod`` fail any message without a clipping norm,
    so they cannot sit on the ClientApp unconditionally; this dispatches to them only when the
    server's DP wrapper sent the norm.
    """
    cfg = msg.content.config_records.get(keys.CONFIG)
    if cfg is None or KEY_CLIPPING_NORM not in cfg:
        return call_next(msg, context)
    exp = ExperimentConfig.from_json(str(cfg[keys.EXPERIMENT]))
    mod = adaptiveclipping_mod if exp.privacy.clipping == "adaptive" else fixedclipping_mod
    return mod(msg, context, call_next)
