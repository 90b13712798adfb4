"""Save and restore a strategy's state, so that a restarted coordinator aggregates exactly as before.

Flower's strategies keep their server-side optimizer state in attributes and offer no way to save
it: FedAdam/FedYogi/FedAdagrad (``FedOpt``) keep the moments ``m_t``/``v_t``; FedAvgM keeps
``momentum_vector`` and the model it last produced (``current_arrays``); the adaptive-clipping DP
wrappers keep ``clipping_norm``. medflower's own strategies (SCAFFOLD) expose ``state_dict()`` /
``load_state_dict()``. This module reads and writes all of them as one flat dict of numpy arrays
and Python scalars (what ``numpy.savez`` or a checkpoint file stores), walking wrappers
(``RobustStrategy``, Flower's DP wrappers) through their ``.strategy`` attribute.

Keys are ``<ClassName>/<field>[/<index>/<array key>]``; the dict carries ``format`` (an int).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvgM, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

FORMAT = 1


@runtime_checkable
class Stateful(Protocol):
    """A strategy of medflower's own that saves its state (e.g. SCAFFOLD's control variate)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> set[str]:
        """Restore ``state`` (an empty dict resets); returns the keys it used."""
        ...


def unwrap(strategy: Strategy) -> Iterator[Strategy]:
    """The strategy and every strategy it wraps (outermost first)."""
    s: Any = strategy
    seen = set()
    while s is not None and id(s) not in seen:
        seen.add(id(s))
        yield s
        s = s.__dict__.get("strategy") if hasattr(s, "__dict__") else None


def put_arrays(out: dict[str, Any], prefix: str, d: dict[str, np.ndarray] | None) -> None:
    """Store ``d`` as ``<prefix>/<index>/<name>`` entries: the index keeps the order (FedAvgM zips
    arrays by position) whatever container the checkpoint uses, without string arrays."""
    for i, (k, v) in enumerate((d or {}).items()):
        out[f"{prefix}/{i:05d}/{k}"] = np.array(v, copy=True)


def get_arrays(state: dict[str, Any], prefix: str, used: set[str]) -> dict[str, np.ndarray] | None:
    """What :func:`put_arrays` stored under ``prefix`` (None if nothing), in the saved order."""
    found = []
    for full, v in state.items():
        if full.startswith(prefix + "/"):
            idx, _, name = full[len(prefix) + 1 :].partition("/")
            if not idx.isdigit() or not name:
                raise ValueError(f"strategy state: malformed key {full!r} (expected {prefix}/<index>/<name>)")
            found.append((int(idx), name, full, v))
    if not found:
        return None
    used |= {f[2] for f in found}
    return {name: np.array(v, copy=True) for _, name, _, v in sorted(found, key=lambda f: f[0])}


def _one_state(s: Strategy) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(s, Stateful):
        out.update(s.state_dict())
    if isinstance(s, FedOpt):
        put_arrays(out, "m_t", s.m_t)
        put_arrays(out, "v_t", s.v_t)
    if isinstance(s, FedAvgM) and s.current_arrays is not None:
        cur = {k: a.numpy() for k, a in s.current_arrays.items()}
        put_arrays(out, "current_arrays", cur)
        if s.momentum_vector is not None:
            put_arrays(out, "momentum_vector", dict(zip(cur, s.momentum_vector, strict=True)))
    if "clipping_norm" in getattr(s, "__dict__", {}):  # Flower's adaptive-clipping DP wrappers
        out["clipping_norm"] = float(s.clipping_norm)  # type: ignore[attr-defined]
    return out


def strategy_state_dict(strategy: Strategy) -> dict[str, Any]:
    """Everything (beyond the global model) that the next round's aggregation depends on."""
    state: dict[str, Any] = {"format": FORMAT}
    for s in unwrap(strategy):
        name = type(s).__name__
        for k, v in _one_state(s).items():
            state[f"{name}/{k}"] = v
    return state


def load_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """Restore what :func:`strategy_state_dict` saved into a freshly built, identical strategy.

    Raises ValueError naming the key when the state belongs to another strategy or format.
    """
    fmt = int(state.get("format", -1))
    if fmt != FORMAT:
        raise ValueError(f"strategy state: format {fmt} is not supported (expected {FORMAT})")
    used = {"format"}
    for s in unwrap(strategy):
        name = type(s).__name__
        mine = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + "/")}
        if not mine:
            _reset(s)
            continue
        inner_used: set[str] = set()
        if isinstance(s, Stateful):
            inner_used |= s.load_state_dict(mine)
        if isinstance(s, FedOpt):
            s.m_t = get_arrays(mine, "m_t", inner_used)
            s.v_t = get_arrays(mine, "v_t", inner_used)
        if isinstance(s, FedAvgM):
            cur = get_arrays(mine, "current_arrays", inner_used)
            s.current_arrays = None if cur is None else ArrayRecord({k: Array(v) for k, v in cur.items()})
            mom = get_arrays(mine, "momentum_vector", inner_used)
            s.momentum_vector = None if mom is None else [mom[k] for k in (cur or mom)]
        if "clipping_norm" in mine:
            s.clipping_norm = float(mine["clipping_norm"])  # type: ignore[attr-defined]
            inner_used.add("clipping_norm")
        used |= {f"{name}/{k}" for k in inner_used}
    unknown = sorted(set(state) - used)
    if unknown:
        names = [type(s).__name__ for s in unwrap(strategy)]
        raise ValueError(
            f"strategy state: key {unknown[0]!r} does not belong to this strategy "
            f"({' > '.join(names)}); was it saved from another strategy?"
        )


def _reset(s: Strategy) -> None:
    """No saved state for this layer: return it to its initial (first-round) state."""
    if isinstance(s, Stateful):
        s.load_state_dict({})
    if isinstance(s, FedOpt):
        s.m_t, s.v_t = None, None
    if isinstance(s, FedAvgM):
        s.current_arrays, s.momentum_vector = None, None
