"""The coordinator's global test: its own held-out data, prepared exactly as the hospitals prepare theirs.

A deployed coordinator's ``data:`` is read by :func:`medflower.data.load_dataset`, the same readers
and preparation a hospital's site YAML goes through (:func:`medflower.data.manifest.load_file_dataset`
for ``folders``/``manifest``/``decathlon``), so a test set exported in the hospitals' format is
prepared as their training data is. What the code cannot know is whether the coordinator's data *is*
in the hospitals' format: a MedMNIST ``.npz`` (scaled to [-1, 1]) scoring a model trained on PNG
exports (scaled to [0, 1]) gives wrong metrics silently. So every hospital reply carries its
preparation fingerprint (:mod:`medflower.data.preparation`), and :class:`GlobalTest` is also a
screen: a reply whose preparation differs from the coordinator's in a way that changes pixels stops
the run with :class:`PreparationMismatch`, naming both sides, before a wrong metric is recorded.

A coordinator with ``data: {kind: none}`` runs no global test and says so (log and
``summary.json``'s ``global_test_note``).
"""

from __future__ import annotations

from logging import WARNING
from typing import Any

from flwr.app import ArrayRecord, Message
from flwr.common.logger import log

from medflower import keys
from medflower.config import ExperimentConfig
from medflower.data import load_dataset
from medflower.data.preparation import Preparation, fingerprint, pixel_differences
from medflower.device import Amp, inference_amp, resolve_device
from medflower.modelspec import build_experiment_model
from medflower.server.loop import RoundAborted
from medflower.server.screens import RoundView, Verdict, site_field
from medflower.tasks import evaluate, inference_roi

NO_DATA_NOTE = "no global test: the coordinator has no data (data.kind: none); see the sites' own test results"


class PreparationMismatch(RoundAborted):
    """A site prepares its images differently from the coordinator's test data: metrics would be wrong."""


class GlobalTest:
    """The server-side test (a callable for the round pipeline) and the preparation screen."""

    def __init__(self, exp: ExperimentConfig) -> None:
        self.exp = exp
        self.note = ""
        self.preparation: Preparation | None = None
        self._test = None
        self._model = None
        if exp.data.kind == "none":
            self.note = NO_DATA_NOTE
            log(WARNING, "global test: %s", NO_DATA_NOTE)
            return
        ds = load_dataset(exp)
        self.preparation = fingerprint(exp.data, ds)
        if len(ds.test) == 0:
            self.note = f"no global test: the coordinator's data ({exp.data.kind}) has an empty test split"
            log(WARNING, "global test: %s", self.note)
            return
        self._test = ds.test
        # train.device where this machine has it; a coordinator without the hospitals' GPU evaluates on
        # its CPU (with a warning) rather than stopping the federation (medflower/device.py)
        device = resolve_device(exp.train.device, where="coordinator (global evaluation)", fallback=True)
        self._amp: Amp | None = inference_amp(device, exp.train.precision)
        self._model = build_experiment_model(exp).to(device)

    @property
    def runs(self) -> bool:
        return self._test is not None

    def __call__(self, server_round: int, arrays: ArrayRecord) -> dict[str, Any]:
        if self._model is None or self._test is None:
            return {}
        self._model.load_state_dict(arrays.to_torch_state_dict())
        return evaluate(
            self._model,
            self._test,
            task=self.exp.task,
            batch_size=self.exp.train.eval_batch_size,
            roi_size=inference_roi(self.exp),
            amp=self._amp,
            histograms=True,  # scored at the threshold chosen on the sites' validation (server/results.py)
            confusion=True,
        )

    def check(self, msg: Message, view: RoundView) -> Verdict | None:
        """Screen: stop the run if the reply's site prepares pixels differently from the coordinator."""
        text = site_field(msg, keys.PREPARATION)
        if not self.runs or self.preparation is None or text is None:
            return None  # nothing to compare: no global test, or a simulated site
        try:
            theirs = Preparation.from_json(text)
        except (ValueError, TypeError, KeyError):
            return None
        diff = pixel_differences(self.preparation, theirs)
        if not diff:
            return None
        site = site_field(msg, keys.SITE_NAME) or f"node-{msg.metadata.src_node_id}"
        raise PreparationMismatch(
            f"the coordinator's test data and site {site!r} are prepared differently ({', '.join(diff)}), so the "
            f"global test would score other pixels than the sites train on: coordinator: "
            f"{self.preparation.describe()}; {site}: {theirs.describe()}. Give the coordinator a test set in "
            "the hospitals' format (e.g. data.kind folders or manifest, with the experiment's preparation keys) "
            "or data.kind: none (no global test)"
        )
