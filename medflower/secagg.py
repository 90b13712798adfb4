"""SecAgg+'s wire format on the Message API, shared by the sites and the coordinator.

Flower's SecAgg+ (``flwr.client.mod.secaggplus_mod``, ``flwr.server.workflow.SecAggPlusWorkflow``)
masks one flat list of arrays taken from a legacy ``FitRes`` and quantizes the *model*. medflower's
train replies are Message-API replies with one or more ArrayRecords (the model, and SCAFFOLD's
control-variate change), so this module, written here because Flower lacks it, defines:

* the masked vector's layout: one entry per array of each ArrayRecord a valid reply carries (the
  method's :func:`~medflower.strategies.registry.Method.reply_arrays`), named ``<record>/<key>``,
  each record preceded by its quantized weight ``<record>/#weight`` (Flower's ``factor_combine``);
* what is masked: for the model record (``keys.ARRAYS``) the site's *update* ``y - x_global``
  scaled by its weight ``w / max_weight``; every other record (a control-variate change, averaged
  uniformly by its method) with weight 1. Masking the update rather than the model keeps the values
  well inside ``clipping_range`` and the quantization error small;
* :func:`quantize_groups` / :func:`dequantize_sum`: Flower's quantization
  (``flwr.common.secure_aggregation.quantization``) and factor helpers around that layout.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_combine, factor_extract, parameters_multiply
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from medflower import keys

WEIGHT = "#weight"
SEED_DIGEST = "seed-sha256"  # stage record of a masked reply: SHA-256 of the site's mask seed (its commitment)
CLIPPED = "secagg-clipped"  # MetricRecord key of a masked reply: coordinates the clipping range changed
Layout = list[tuple[str, tuple[int, ...]]]  # (flat key, shape) in the order the vector is masked
Groups = dict[str, dict[str, np.ndarray]]  # record name -> key -> float64 array


def flat_key(record: str, key: str) -> str:
    return f"{record}/{key}"


def layout(spec: Mapping[str, Mapping[str, tuple[tuple[int, ...], str]]]) -> Layout:
    """The masked vector's entries for a reply layout (record -> key -> (shape, dtype)).

    Records and keys are sorted: the site and the coordinator draw the masks array by array, so both
    must walk the arrays in one order whatever order a record happens to hold them in.
    """
    out: Layout = []
    for record in sorted(spec):
        out.append((flat_key(record, WEIGHT), (1,)))
        out += [(flat_key(record, k), tuple(spec[record][k][0])) for k in sorted(spec[record])]
    return out


def group_ratio(record: str, weight: float, max_weight: float) -> float:
    """The model record is weighted by the site's weight; any other record is a uniform mean (ratio 1)."""
    return min(max(weight, 0.0), max_weight) / max_weight if record == keys.ARRAYS else 1.0


def quantize_groups(
    groups: Groups, *, weight: float, max_weight: float, clipping_range: float, quantization_range: int
) -> tuple[list[str], list[np.ndarray], int]:
    """Flat keys and int64 arrays to mask (records sorted, each led by its quantized ratio); and how many
    coordinates the clipping changed (the site reports that count, a scalar, so a too small
    ``clipping_range`` shows)."""
    names: list[str] = []
    arrays: list[np.ndarray] = []
    clipped = 0
    for record in sorted(groups):
        ratio = group_ratio(record, weight, max_weight)
        q_ratio = round(ratio * quantization_range)
        scaled = parameters_multiply(list(groups[record].values()), q_ratio / quantization_range)
        clipped += sum(int(np.count_nonzero(np.abs(a) > clipping_range)) for a in scaled)
        quantized = quantize(scaled, clipping_range, quantization_range)
        names += [flat_key(record, WEIGHT)] + [flat_key(record, k) for k in groups[record]]  # sorted by the caller
        arrays += [a.astype(np.int64) for a in factor_combine(q_ratio, quantized)]
    return names, arrays, clipped


def dequantize_sum(
    entries: Mapping[str, np.ndarray], *, num_sites: int, clipping_range: float, quantization_range: int
) -> tuple[Groups, dict[str, float]]:
    """Each record's weighted mean from the unmasked sums of ``num_sites`` vectors, and each record's
    total ratio (the sum of the sites' ``w / max_weight``; 0 leaves that record out).

    Flower's workflow does the same on one flat list (``SecAggPlusWorkflow.unmask_stage``): dequantize,
    undo the ``num_sites - 1`` extra shifts by ``clipping_range``, divide by the summed ratio.
    """
    records: dict[str, list[str]] = {}
    for name in entries:
        record, key = name.split("/", 1)  # record names hold no "/"
        if key != WEIGHT:
            records.setdefault(record, []).append(key)
    out: Groups = {}
    totals: dict[str, float] = {}
    for record, record_keys in records.items():
        vector = [entries[flat_key(record, WEIGHT)]] + [entries[flat_key(record, k)] for k in record_keys]
        q_total, quantized = factor_extract(vector)
        totals[record] = float(q_total) / quantization_range
        if q_total <= 0:
            continue
        values = dequantize(quantized, clipping_range, quantization_range)
        offset = -(num_sites - 1) * clipping_range
        out[record] = {
            k: (v + offset) * (quantization_range / float(q_total)) for k, v in zip(record_keys, values, strict=True)
        }
    return out, totals


def wire_dtype(modulus_range: int) -> type[np.unsignedinteger]:
    """The smallest unsigned dtype that holds values modulo ``modulus_range`` (uint32 for the default 2**32)."""
    return np.uint32 if modulus_range <= 2**32 else np.uint64
