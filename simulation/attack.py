"""SIMULATION-ONLY poisoned updates, for measuring how robust an aggregation strategy is.

A research feature: the experiment's ``attack:`` section (:class:`medflower.config.AttackConfig`)
names simulated sites that, after training honestly, send a poisoned update instead. Only the
simulation's ClientApp applies it (:func:`attacked_update`, its ``transform_update``; see
:mod:`medflower.simulation.clientapp`); a deployed hospital node never loads this module and refuses an
experiment that sets it.

* ``sign_flip`` — the update is reversed and scaled: ``global - scale * (local - global)`` (the
  classic model-poisoning baseline of the Byzantine-robust FL literature);
* ``nonfinite`` — every floating-point array gets a NaN and an Inf (a diverged or corrupted site);
* ``wrong_shape`` — the first multi-element array loses its last element (a site with another
  model version).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from medflower.config import ExperimentConfig
from medflower.config.attack import AttackConfig


def attacked_update(
    arrays: ArrayRecord, global_arrays: ArrayRecord, exp: ExperimentConfig, site_name: str
) -> ArrayRecord:
    """The update ``site_name`` sends: poisoned if ``exp.attack`` names it, else ``arrays`` unchanged."""
    if exp.attack.kind == "none" or site_name not in exp.attack.sites:
        return arrays
    return poison(arrays, global_arrays, exp.attack)


def poison(arrays: ArrayRecord, global_arrays: ArrayRecord, cfg: AttackConfig) -> ArrayRecord:
    """The poisoned version of a site's outgoing ``arrays`` (``global_arrays``: what it received)."""
    out: dict[str, Array] = {}
    reshaped = False
    for k, a in arrays.items():
        x = a.numpy()
        floating = np.dtype(x.dtype).kind == "f"
        if cfg.kind == "sign_flip" and floating:
            g = global_arrays[k].numpy()
            x = (g - cfg.scale * (x - g)).astype(x.dtype)
        elif cfg.kind == "nonfinite" and floating and x.size:
            x = np.array(x, copy=True)
            x.flat[0] = np.nan
            x.flat[-1] = np.inf
        elif cfg.kind == "wrong_shape" and not reshaped and x.size > 1:
            x = np.ascontiguousarray(x.reshape(-1)[:-1])
            reshaped = True
        elif cfg.kind not in ("sign_flip", "nonfinite", "wrong_shape"):
            raise ValueError(
                f"attack.kind: invalid value {cfg.kind!r}; valid choices are 'sign_flip', 'nonfinite', 'wrong_shape'"
            )
        out[k] = Array(np.ascontiguousarray(x))
    return ArrayRecord(out)
