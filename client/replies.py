"""What a site reads from a coordinator's message, and the replies it can send.

A reply carries exactly: the model's arrays (train only), one MetricRecord of scalars and the
site's public name (``keys.SITE``). A *refusal* (:func:`refusal_reply`) is an answer, not an error:
no arrays, ``num-examples: 0`` and, beside the name, ``keys.REFUSAL``: the rule the site applies
and why (``"policy.max_rounds: round 6 exceeds this site's limit of 5"``). The coordinator sets it
aside and records it in the round's ``refusals`` (``medflower.server.screens.SiteRefusals``).
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from medflower import keys, records
from medflower.client.errors import MessageError
from medflower.config import ExperimentConfig
from medflower.schema import ConfigError


def experiment_of(msg: Message) -> ExperimentConfig:
    """The experiment the message carries (``keys.EXPERIMENT``); a missing or invalid one is a :class:`MessageError`."""
    try:
        cfg = records.config(msg, keys.CONFIG)
    except ValueError as err:
        raise MessageError(str(err)) from err
    if keys.EXPERIMENT not in cfg:
        raise MessageError(f"the server's message lacks config key {keys.EXPERIMENT!r} (protocol {keys.PROTOCOL})")
    try:
        return ExperimentConfig.from_json(str(cfg[keys.EXPERIMENT]))
    except (ConfigError, ValueError, TypeError) as err:
        raise MessageError(f"the message's experiment is not valid: {err}") from err


def site_reply(
    msg: Message,
    site_name: str,
    metrics: Mapping[str, float | int | list[int] | list[float]],
    arrays: ArrayRecord | None,
    preparation: str | None = None,
) -> Message:
    """A site's answer; ``preparation`` (a hospital: :mod:`medflower.data.preparation`'s fingerprint
    JSON, no paths) lets the coordinator check its own test set is prepared the same way."""
    site = ConfigRecord({keys.SITE_NAME: site_name})
    if preparation:
        site[keys.PREPARATION] = preparation
    content = RecordDict({keys.METRICS: MetricRecord(dict(metrics)), keys.SITE: site})
    if arrays is not None:
        content[keys.ARRAYS] = arrays
    return Message(content=content, reply_to=msg)


def refusal_reply(msg: Message, site_name: str, refusal: str) -> Message:
    """The site refuses ``msg`` before any work: no arrays, ``num-examples: 0``, the rule and why."""
    content = RecordDict(
        {
            keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 0}),
            keys.SITE: ConfigRecord({keys.SITE_NAME: site_name, keys.REFUSAL: refusal}),
        }
    )
    return Message(content=content, reply_to=msg)
