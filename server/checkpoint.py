"""Round checkpoints: a restarted coordinator resumes where the run stopped.

Flower 1.42's ServerApp keeps the run's state in memory only: when the ServerApp process dies (host
reboot, OOM kill, a coordinator upgrade) the run is lost and every hospital's compute with it
(OpenFL #1619 is the same problem in another framework). Flower has no checkpoint facility for the
Message API, so this module writes one after every round: the global model, the strategy's own
state (when the strategy can export it), the round number and the run's History.

One file, ``checkpoint.pt``, is written to a temporary name, flushed to disk and renamed over the
old one, so a crash at any instant leaves either the previous or the new checkpoint, never a torn
one. ``checkpoint.json`` next to it is a human-readable digest (round, experiment, restarts).

A checkpoint records the fingerprint of the experiment that wrote it; resuming with a different
experiment is refused instead of silently mixing two experiments' rounds.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass, field, fields
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common.logger import log

from medflower.config import ConfigError, ExperimentConfig
from medflower.fileio import atomic_write_bytes
from medflower.server.build import RoundParts
from medflower.server.loop import History, RoundRecord

RUN_CHECKPOINT_DIR = "checkpoint-dir"  # run_config key; "" = <output-dir>/checkpoint
CHECKPOINT_FILE = "checkpoint.pt"
DIGEST_FILE = "checkpoint.json"
FORMAT = 2  # 2: strategy_state holds the round parts' state (strategy and privacy stage)


@dataclass
class Checkpoint:
    """What a run needs to continue after ``round``."""

    round: int
    arrays: ArrayRecord
    history: History
    strategy_state: Any = None
    starts: list[dict[str, Any]] = field(default_factory=list)  # one entry per (re)start of the ServerApp


def experiment_fingerprint(exp: ExperimentConfig) -> str:
    """Hash of the experiment's settings (not of where its YAML lives)."""
    d = exp.to_dict()
    d.pop("base_dir", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ---- (de)serialising strategy state: tensors and plain containers only (torch.load weights_only) ----


def _encode(obj: Any, path: str) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.array(obj, order="C"))}
    if isinstance(obj, torch.Tensor):
        return {"__tensor__": obj.detach().cpu()}
    if isinstance(obj, ArrayRecord):
        return {"__arrayrecord__": _arrays_to_tensors(obj)}
    if isinstance(obj, (MetricRecord, ConfigRecord)):
        return {f"__{type(obj).__name__.lower()}__": _encode(dict(obj), path)}
    if isinstance(obj, dict):
        return {"__dict__": [[_encode(k, f"{path}.<key>"), _encode(v, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        enc = [_encode(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        return {"__tuple__": enc} if isinstance(obj, tuple) else enc
    raise TypeError(
        f"checkpoint: strategy state at {path} has a {type(obj).__name__}; a strategy's "
        "state may hold numbers, strings, numpy arrays, tensors, Flower records, lists and dicts"
    )


def _decode(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__ndarray__" in obj:
        return obj["__ndarray__"].numpy()
    if "__tensor__" in obj:
        return obj["__tensor__"]
    if "__arrayrecord__" in obj:
        return ArrayRecord(obj["__arrayrecord__"])
    if "__metricrecord__" in obj:
        return MetricRecord(_decode(obj["__metricrecord__"]))
    if "__configrecord__" in obj:
        return ConfigRecord(_decode(obj["__configrecord__"]))
    if "__tuple__" in obj:
        return tuple(_decode(v) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {_decode(k): _decode(v) for k, v in obj["__dict__"]}
    raise ValueError(f"checkpoint: unknown encoded object with keys {sorted(obj)}")


def _arrays_to_tensors(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(a.numpy(), order="C")) for k, a in arrays.items()}


def _history_to_dict(hist: History) -> dict[str, Any]:
    return {
        "rounds": [asdict(r) for r in hist.rounds],
        "initial_global_test": dict(hist.initial_global_test),
        "sites_test": {k: dict(v) for k, v in hist.sites_test.items()},
        "site_names": {int(k): str(v) for k, v in getattr(hist, "site_names", {}).items()},
    }


def _history_from_dict(d: dict[str, Any]) -> History:
    names = {f.name for f in fields(RoundRecord)}
    rounds = [RoundRecord(**{k: v for k, v in r.items() if k in names}) for r in d.get("rounds", [])]
    hist = History(
        rounds=rounds,
        initial_global_test=dict(d.get("initial_global_test", {})),
        sites_test=dict(d.get("sites_test", {})),
    )
    if hasattr(hist, "site_names"):
        hist.site_names.update({int(k): str(v) for k, v in d.get("site_names", {}).items()})
    return hist


def save_checkpoint(ckpt_dir: str | Path, exp: ExperimentConfig, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` atomically to ``ckpt_dir/checkpoint.pt`` (and its JSON digest)."""
    ckpt_dir = Path(ckpt_dir)
    payload = {
        "format": FORMAT,
        "experiment": experiment_fingerprint(exp),
        "experiment_name": exp.name,
        "round": int(ckpt.round),
        "arrays": _arrays_to_tensors(ckpt.arrays),
        "history": _encode(_history_to_dict(ckpt.history), "history"),
        "strategy_state": _encode(ckpt.strategy_state, "strategy_state"),
        "starts": _encode(ckpt.starts, "starts"),
        "saved_at": time.time(),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    path = ckpt_dir / CHECKPOINT_FILE
    atomic_write_bytes(path, buf.getvalue())
    digest = {k: payload[k] for k in ("format", "experiment", "experiment_name", "round", "saved_at")}
    digest["rounds_in_history"] = [r.round for r in ckpt.history.rounds]
    digest["starts"] = ckpt.starts
    digest["strategy_state_saved"] = ckpt.strategy_state is not None
    atomic_write_bytes(ckpt_dir / DIGEST_FILE, json.dumps(digest, indent=2).encode())
    return path


def load_checkpoint(ckpt_dir: str | Path, exp: ExperimentConfig) -> Checkpoint | None:
    """The checkpoint in ``ckpt_dir`` (None if there is none); refuses another experiment's."""
    path = Path(ckpt_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"{path}: unreadable checkpoint ({err}); move it away to start the run from round 1") from err
    if payload.get("format") != FORMAT:
        raise ConfigError(f"{path}: checkpoint format {payload.get('format')!r}, this version reads {FORMAT}")
    if payload.get("experiment") != experiment_fingerprint(exp):
        raise ConfigError(
            f"{path}: this checkpoint was written by experiment {payload.get('experiment_name')!r} with other "
            f"settings than the current {exp.name!r}; use another checkpoint-dir/output-dir or move it away"
        )
    return Checkpoint(
        round=int(payload["round"]),
        arrays=ArrayRecord(payload["arrays"]),
        history=_history_from_dict(_decode(payload["history"])),
        strategy_state=_decode(payload["strategy_state"]),
        starts=list(_decode(payload.get("starts", []))),
    )


class Checkpointer:
    """``on_round_end`` callback for :func:`medflower.server.loop.run_rounds` that saves every round."""

    def __init__(
        self, *, ckpt_dir: str | Path, exp: ExperimentConfig, parts: RoundParts, starts: list[dict[str, Any]]
    ) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.exp = exp
        self.parts = parts
        self.starts = starts

    def __call__(self, rnd: int, arrays: ArrayRecord, hist: History) -> None:
        save_checkpoint(
            self.ckpt_dir,
            self.exp,
            Checkpoint(
                round=rnd,
                arrays=arrays,
                history=hist,
                strategy_state=self.parts.state_dict(),
                starts=self.starts,
            ),
        )
        log(INFO, "checkpoint: round %d saved to %s", rnd, self.ckpt_dir / CHECKPOINT_FILE)


def resume_or_start(
    ckpt_dir: str | Path, exp: ExperimentConfig, parts: RoundParts, initial_arrays: ArrayRecord
) -> tuple[int, ArrayRecord, History, Checkpointer]:
    """(start_round, arrays, history, on_round_end) for a fresh or a resumed run."""
    ckpt = load_checkpoint(ckpt_dir, exp)
    if ckpt is None:
        start, arrays, hist, starts = 1, initial_arrays, History(), []
    else:
        start, arrays, hist, starts = ckpt.round + 1, ckpt.arrays, ckpt.history, ckpt.starts
        if ckpt.strategy_state is not None:
            parts.load_state_dict(ckpt.strategy_state)
        log(INFO, "checkpoint: resuming %r after round %d from %s", exp.name, ckpt.round, Path(ckpt_dir))
    starts = [*starts, {"start_round": start, "time": time.time()}]
    return start, arrays, hist, Checkpointer(ckpt_dir=ckpt_dir, exp=exp, parts=parts, starts=starts)
