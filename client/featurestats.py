"""A site's release of its training features' statistics under DP (``privacy.feature_stats_noise``).

The coordinator asks twice before round 1 (a ``query`` message each, :mod:`medflower.server.featurestats`): first
for the sum of the clipped whitened feature rows of every training image (stage ``mean``), then for the sum of the
squares of their clipped deviations from the federation's noisy mean (stage ``var``). Each answer is one Gaussian
mechanism (:func:`medflower.featurestats.noised_sum`), charged write-ahead to the same ledger DP-SGD charges, as the
entry ``(noise_multiplier, 1.0, 1)`` (a release of the whole training set, no sampling), and refused when it
would take the site past its budget. DP-SGD's noise multiplier is planned with both releases already in the ledger
(:func:`medflower.client.privacy.site_plan`), so the run as a whole stays at the site's epsilon.
"""

from __future__ import annotations

from logging import WARNING

import torch
from flwr.app import Context, Message
from flwr.common.logger import log
from torch import nn

from medflower import keys, records
from medflower.client.privacy import _secret_generator, load_ledger, node_float, store_ledger
from medflower.client.replies import site_reply
from medflower.client.state import LedgerPlace
from medflower.client.train import make_loader
from medflower.config import ExperimentConfig
from medflower.data import SiteData
from medflower.featurestats import noised_sum, whitened_inputs
from medflower.schema import ConfigError

STAGES = ("mean", "var")


def release_feature_stats(
    msg: Message,
    context: Context,
    *,
    exp: ExperimentConfig,
    site: SiteData,
    model: nn.Module,
    place: LedgerPlace | None,
    device: torch.device | None = None,
) -> Message:
    """Answer one feature-statistics query with the site's noised sum (or a refusal when the budget is spent)."""
    sigma = exp.privacy.feature_stats_noise
    if sigma is None or exp.privacy.mode != "sample":
        raise ConfigError("a feature-statistics query needs privacy.mode 'sample' and privacy.feature_stats_noise")
    cfg = records.config(msg, keys.CONFIG)
    stage = records.get_str(cfg, keys.FEATURE_STATS_STAGE, "")
    if stage not in STAGES:
        raise ValueError(f"config {keys.FEATURE_STATS_STAGE}: expected one of {', '.join(STAGES)}, got {stage!r}")
    bound = records.get_float(cfg, keys.FEATURE_STATS_BOUND, 0.0)
    if not bound > 0:
        raise ValueError(f"config {keys.FEATURE_STATS_BOUND}: must be > 0, got {bound}")
    # the site's budget (the strictest of the experiment's, its sites entry and its node config); not its DP-SGD
    # plan, which cannot be made when the statistics alone would exceed the budget: that is a refusal here
    target_epsilon, target_delta = exp.privacy.site_budget(
        site.name,
        node_epsilon=node_float(context, keys.NODE_DP_TARGET_EPSILON),
        node_delta=node_float(context, keys.NODE_DP_TARGET_DELTA),
    )
    ledger = load_ledger(context, site=site.name, mechanism=exp.privacy.accountant, place=place)
    after = ledger.projected_epsilon(target_delta, noise_multiplier=sigma, sample_rate=1.0, steps=1)
    if after > target_epsilon:
        spent = ledger.epsilon(target_delta)
        log(
            WARNING,
            "site %s refuses to release its feature statistics (%s): epsilon %.4f of %.4f spent, this would reach %.4f",
            site.name,
            stage,
            spent,
            target_epsilon,
            after,
        )
        refused = {keys.NUM_EXAMPLES: 0, keys.DP_EPSILON: spent, keys.DP_EPSILON_NEXT: after, keys.DP_EXHAUSTED: 1}
        store_ledger(context, ledger, place)
        return site_reply(msg, site.name, refused, None)
    ledger.begin(
        server_round=0,
        noise_multiplier=sigma,
        sample_rate=1.0,
        steps=1,
        run_id=int(context.run_id),
        delta=target_delta,
    )
    store_ledger(context, ledger, place)  # write-ahead: charged even if this process dies before replying
    loader = make_loader(site.train, exp.train.eval_batch_size, 0, shuffle=False)
    rows = whitened_inputs(model, (x for x, _ in loader), device=device)
    centre = None
    if stage == "var":
        raw = cfg.get(keys.FEATURE_STATS_CENTRE)
        if not isinstance(raw, list) or len(raw) != rows.shape[1]:
            raise ValueError(f"config {keys.FEATURE_STATS_CENTRE}: expected {rows.shape[1]} numbers")
        centre = torch.tensor([float(v) for v in raw], dtype=torch.float64)
    total = noised_sum(
        rows, stage=stage, bound=bound, noise_multiplier=sigma, generator=_secret_generator(), centre=centre
    )
    ledger.commit()
    store_ledger(context, ledger, place)
    metrics: dict[str, float | int | list[float]] = {
        keys.NUM_EXAMPLES: len(rows),
        keys.FEATURE_SUM: [float(v) for v in total],
        keys.DP_EPSILON: ledger.epsilon(target_delta),
        keys.DP_DELTA: target_delta,
        keys.DP_TARGET_EPSILON: target_epsilon,
    }
    return site_reply(msg, site.name, metrics, None)
