"""The coordinator's half of ``privacy.feature_stats_noise``: before round 1, standardise the head's input with
feature statistics the sites release under DP (the mechanism: :mod:`medflower.featurestats`).

Two ``query`` messages to every site, then a fold into the global model:

1. the clipping bounds are read off synthetic images (:func:`medflower.prior.synthetic_batches`, seeded from the
   experiment's seed) through the initial model: no data, no privacy cost;
2. stage ``mean``: each site returns its noised sum of clipped whitened feature rows and its image count; the
   federation's mean is the sum of the sums over the sum of the counts;
3. stage ``var``: the same for the squared deviations from that mean; the spreads follow
   (:func:`medflower.featurestats.spread_from`);
4. both are folded into the head's fixed map (:func:`medflower.featurestats.fold_standardisation`), so the model
   every site receives from round 1 on carries them.

Sums are taken in site order (not arrival order). A site that fails, refuses (its budget) or returns a
malformed sum (wrong length, not finite) is left out and named in ``summary.json``'s ``feature_stats``; when
no site answers a stage, the head keeps its synthetic whitening and the summary says why.
"""

from __future__ import annotations

import math
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid

from medflower import keys, progress
from medflower.config import ExperimentConfig
from medflower.device import resolve_device
from medflower.featurestats import (
    SYNTHETIC_SAMPLES,
    clipping_bounds,
    fold_standardisation,
    spread_from,
    whitened_head,
    whitened_inputs,
)
from medflower.modelspec import WhitenedHead, build_experiment_model
from medflower.prior import synthetic_batches
from medflower.seeding import derive_seed
from medflower.server.canonical import canonical
from medflower.server.loop import reported_site_name
from medflower.server.screens import site_field


def _released(
    reply: Message, *, width: int, site: str, failures: list[dict[str, Any]]
) -> tuple[torch.Tensor, int] | None:
    """(noised sum, count) of one reply, or None (the reason appended to ``failures``)."""
    if reply.has_error():
        failures.append({"site": site, "reason": str(reply.error.reason)})
        return None
    refusal = site_field(reply, keys.REFUSAL)
    metrics = {k: v for rec in reply.content.metric_records.values() for k, v in rec.items()}
    if refusal or metrics.get(keys.DP_EXHAUSTED) == 1 or keys.FEATURE_SUM not in metrics:
        failures.append({"site": site, "reason": refusal or "refused: privacy budget spent, or no sum sent"})
        return None
    values, count = metrics[keys.FEATURE_SUM], metrics.get(keys.NUM_EXAMPLES, 0)
    if not isinstance(values, list) or len(values) != width:
        got = len(values) if isinstance(values, list) else type(values).__name__
        failures.append({"site": site, "reason": f"malformed {keys.FEATURE_SUM}: {got} values, expected {width}"})
        return None
    total = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if not bool(torch.isfinite(total).all()) or not (isinstance(count, int | float) and math.isfinite(count)):
        failures.append({"site": site, "reason": f"non-finite {keys.FEATURE_SUM} or {keys.NUM_EXAMPLES}"})
        return None
    if count < 1:
        failures.append({"site": site, "reason": f"{keys.NUM_EXAMPLES} {count}: no training images"})
        return None
    return total, int(count)


def _ask(
    grid: Grid,
    nodes: list[int],
    *,
    base: ConfigRecord,
    arrays: ArrayRecord,
    stage: str,
    extra: dict[str, Any],
    timeout: float,
    names: dict[int, str],
    width: int,
    report: dict[str, Any],
) -> tuple[torch.Tensor, int]:
    """One stage's (summed release, summed count) over the sites that answered it well."""
    msgs = []
    for nid in nodes:
        cfg = ConfigRecord({**base, keys.SERVER_ROUND: 0, keys.FEATURE_STATS_STAGE: stage, **extra})
        msgs.append(
            Message(
                content=RecordDict({keys.ARRAYS: arrays, keys.CONFIG: cfg}),
                dst_node_id=nid,
                message_type=MessageType.QUERY,
            )
        )
    replies = progress.send_and_receive(grid, msgs, timeout=timeout, server_round=0, stage=f"feature {stage}")
    for r in replies:
        if not r.has_error():
            names.setdefault(int(r.metadata.src_node_id), reported_site_name(r))
    total, count, answered = torch.zeros(width, dtype=torch.float64), 0, set()
    failures: list[dict[str, Any]] = report["failures"]
    for r in canonical(replies, names):  # summed in site order, whatever order they arrived in
        nid = int(r.metadata.src_node_id)
        answered.add(nid)
        site = names.get(nid, f"node-{nid}")
        got = _released(r, width=width, site=site, failures=failures)
        if got is not None:
            total += got[0]
            count += got[1]
            report["sites"].setdefault(site, {})[stage] = got[1]
    for nid in nodes:
        if nid not in answered:
            failures.append({"site": names.get(nid, f"node-{nid}"), "reason": f"no reply within {timeout:.0f}s"})
    for f in failures:
        f.setdefault("stage", stage)
    return total, count


def standardise_head(
    grid: Grid,
    exp: ExperimentConfig,
    arrays: ArrayRecord,
    *,
    timeout: float,
    registered: dict[int, str] | None = None,
) -> tuple[ArrayRecord, dict[str, Any]]:
    """``arrays`` with the head's map standardised by the sites' DP statistics, and the report for summary.json.

    ``registered`` (deployment): node id -> registered site name; only those nodes are asked. None (simulation):
    every connected node, named by its replies.
    """
    sigma = exp.privacy.feature_stats_noise
    if sigma is None:
        raise ValueError("standardise_head needs privacy.feature_stats_noise")
    # the coordinator's device, as for its global evaluation (a CUDA device it lacks: its CPU, with a warning)
    device = resolve_device(exp.train.device, where="coordinator (feature statistics' bounds)", fallback=True)
    model = build_experiment_model(exp)
    model.load_state_dict(arrays.to_torch_state_dict())
    model.to(device)
    head = whitened_head(model)
    gen = torch.Generator().manual_seed(
        derive_seed(exp.seed, "feature-stats-bounds")
    )  # CPU: the images are drawn there
    synthetic = whitened_inputs(model, synthetic_batches(exp, samples=SYNTHETIC_SAMPLES, generator=gen), device=device)
    bound_mean, bound_var = clipping_bounds(synthetic)
    width = synthetic.shape[1]
    names = dict(registered or {})
    nodes = sorted(names) if registered is not None else sorted(int(n) for n in grid.get_node_ids())
    report: dict[str, Any] = {
        "noise_multiplier": sigma,
        "bounds": {"mean": bound_mean, "var": bound_var},
        "sites": {},
        "failures": [],
        "applied": False,
    }
    base = ConfigRecord({keys.EXPERIMENT: exp.to_json()})

    def ask(stage: str, extra: dict[str, Any]) -> tuple[torch.Tensor, int]:
        return _ask(
            grid,
            nodes,
            base=base,
            arrays=arrays,
            stage=stage,
            extra=extra,
            timeout=timeout,
            names=names,
            width=width,
            report=report,
        )

    total, count = ask("mean", {keys.FEATURE_STATS_BOUND: bound_mean})
    if count == 0:
        report["note"] = "no site released its feature means: the head keeps its synthetic whitening"
        log(WARNING, "feature statistics: %s", report["note"])
        return arrays, report
    centre = total / count
    extra = {keys.FEATURE_STATS_BOUND: bound_var, keys.FEATURE_STATS_CENTRE: [float(v) for v in centre]}
    total, count = ask("var", extra)
    if count == 0:
        report["note"] = "no site released its feature variances: the head keeps its synthetic whitening"
        log(WARNING, "feature statistics: %s", report["note"])
        return arrays, report
    scale = spread_from(total / count)
    mean, transform = fold_standardisation(head.mean.cpu(), head.transform.cpu(), centre, scale)
    prefix = next(name for name, m in model.named_modules() if isinstance(m, WhitenedHead))
    state = arrays.to_torch_state_dict()
    state[f"{prefix}.mean"], state[f"{prefix}.transform"] = mean, transform
    report["applied"] = True
    report["mean_norm"] = float(centre.norm())
    report["spread_range"] = [float(scale.min()), float(scale.max())]
    log(
        INFO,
        "feature statistics from %d site(s) (noise multiplier %g): mean norm %.3f, spreads %.3f-%.3f",
        len(report["sites"]),
        sigma,
        report["mean_norm"],
        *report["spread_range"],
    )
    return ArrayRecord(state), report
