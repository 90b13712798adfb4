"""Typed reads from Flower's records: a message's part of the wrong kind is a clear error.

Flower's ``RecordDict`` holds ArrayRecords, MetricRecords and ConfigRecords under string keys, and
a ConfigRecord value may be a number, a string, bytes or a list of them. What a message must carry
is known by its key; these functions check it, so that a malformed message (a bug, or a peer that
speaks another protocol) fails naming the key, not deep inside training.
"""

from __future__ import annotations

from typing import TypeVar

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

R = TypeVar("R", ArrayRecord, ConfigRecord, MetricRecord)


def record(content: RecordDict, key: str, kind: type[R]) -> R:
    """``content[key]``, which must be a ``kind``."""
    if key not in content:
        raise ValueError(f"message: record {key!r} is missing")
    value = content[key]
    if not isinstance(value, kind):
        raise ValueError(f"message: record {key!r} is a {type(value).__name__}, expected a {kind.__name__}")
    return value


def arrays(msg: Message, key: str) -> ArrayRecord:
    return record(msg.content, key, ArrayRecord)


def config(msg: Message, key: str) -> ConfigRecord:
    return record(msg.content, key, ConfigRecord)


def array(rec: ArrayRecord, key: str) -> Array:
    value = rec[key]
    if not isinstance(value, Array):
        raise ValueError(f"message: {key!r} is not an array")
    return value


def _scalar(cfg: ConfigRecord | MetricRecord, key: str) -> int | float | str:
    value = cfg[key]
    if isinstance(value, (list, bytes)):
        raise ValueError(f"message: value {key!r} must be a scalar, got {type(value).__name__}")
    return value


def get_float(cfg: ConfigRecord | MetricRecord, key: str, default: float) -> float:
    """``cfg[key]`` as a float (``default`` when absent); a non-number names the key."""
    if key not in cfg:
        return default
    try:
        return float(_scalar(cfg, key))
    except (TypeError, ValueError) as err:
        raise ValueError(f"message: value {key!r} must be a number, got {cfg[key]!r}") from err


def get_int(cfg: ConfigRecord | MetricRecord, key: str, default: int) -> int:
    return int(get_float(cfg, key, float(default)))


def get_str(cfg: ConfigRecord, key: str, default: str) -> str:
    return str(_scalar(cfg, key)) if key in cfg else default


def get_str_list(cfg: ConfigRecord, key: str) -> list[str]:
    """``cfg[key]`` as a list of strings (empty when absent)."""
    if key not in cfg:
        return []
    value = cfg[key]
    if not isinstance(value, list):
        raise ValueError(f"message: value {key!r} must be a list of strings, got {type(value).__name__}")
    return [str(v) for v in value]


def get_int_list(rec: ConfigRecord | MetricRecord, key: str, *, length: int | None = None) -> list[int]:
    """``rec[key]`` as a list of non-negative integer counts (empty when absent), e.g. a score histogram."""
    if key not in rec:
        return []
    value = rec[key]
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ValueError(f"message: value {key!r} must be a list of non-negative integers, got {value!r:.80}")
    if length is not None and len(value) != length:
        raise ValueError(f"message: value {key!r} must hold {length} values, got {len(value)}")
    return [int(v) for v in value]
