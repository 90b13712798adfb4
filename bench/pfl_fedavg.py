"""The fastest peer as a yardstick: ``bench/plain_fedavg.py``'s work done with pfl-research's simulator.

``python bench/pfl_fedavg.py SITES.npz SPEC.json`` (an interpreter with ``pfl==0.6.0``; see the
``bench-pfl`` extra in pyproject.toml) trains what ``bench/plain_fedavg.py`` trains, written the way
pfl documents FedAvg: :class:`pfl.algorithm.FederatedAveraging` over a
:class:`pfl.aggregate.simulate.SimulatedBackend`, a :class:`pfl.model.pytorch.PyTorchModel` whose central
optimizer is SGD with learning rate 1.0 (so the averaged model difference is applied as is), local
optimizer Adam with the recipe's learning rate, :class:`pfl.aggregate.weighting.WeightByDatapoints`
(weighting by sample count), and a cohort of every site every round (``minimize_reuse`` sampling cycles
through the sites). It shares with the plain loop the inputs and thread count
(:func:`plain_fedavg.load_work`), the network (:class:`medflower.smallcnn.SmallCNN`, built after
``torch.manual_seed(seed)``: the same initial weights), and each site's shuffle order per round
(:func:`plain_fedavg.shuffle_seed`, drawn by a ``DataLoader`` seeded as the plain loop's).
It prints the same one JSON line.

Where pfl cannot say exactly what the plain loop does, the closest honest equivalent:

- Evaluation. The plain loop evaluates the global model on the test split before training and after
  every round, and on every site's validation split after every round. pfl's way to evaluate on a
  held-out set is :class:`pfl.callback.central_evaluation.CentralEvaluationCallback`, one per split
  here (the test split, and each site's non-empty validation split). Such a callback evaluates before training and after
  every central iteration *except the first* (pfl's choice), so each site's validation split is
  evaluated as many times as in the plain loop, and the test split once fewer (one round's test pass
  out of ``rounds + 1``). With ``rounds: 1`` the final model is evaluated on the test split here,
  after training. The per-site validation runs as central evaluations, not as pfl's federated
  ``val`` population: a ``val`` population is only evaluated in iterations where pfl also evaluates
  every training user before and after its local training (two passes over all training data per
  round), work the plain loop does not do.
- pfl always evaluates the training users before and after local training in central iteration 0
  (``iteration % evaluation_frequency == 0``); ``evaluation_frequency`` is set to the number of rounds
  so that this happens there only: two passes over the training data once, about ``1 / (3 * rounds)``
  of the training work.
- Shuffling: pfl's :class:`~pfl.data.dataset.Dataset` does not shuffle, so each site's dataset is built
  in the plain loop's order for that round. With more than one local epoch the plain loop reshuffles
  each epoch and pfl repeats the order (issue 11's workload has one).
- pfl averages trainable parameters only. The ``cnn`` with its default GroupNorm has no buffers; with
  ``norm: batch`` the BatchNorm running statistics would not be averaged here (they are in the plain
  loop).
- Device: the plain loop runs on the CPU; ``PFL_PYTORCH_DEVICE`` defaults to ``cpu`` here so that pfl does
  not move the work to a GPU it finds.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a script: the checkout's medflower, installed or not
os.environ.setdefault("PFL_PYTORCH_DEVICE", "cpu")

import torch  # noqa: E402  (after the lines above)
from pfl.aggregate.simulate import SimulatedBackend  # noqa: E402
from pfl.aggregate.weighting import WeightByDatapoints  # noqa: E402
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams  # noqa: E402
from pfl.callback.base import TrainingProcessCallback  # noqa: E402
from pfl.callback.central_evaluation import CentralEvaluationCallback  # noqa: E402
from pfl.data.dataset import Dataset  # noqa: E402
from pfl.data.federated_dataset import FederatedDataset  # noqa: E402
from pfl.data.sampling import get_user_sampler  # noqa: E402
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams  # noqa: E402
from pfl.metrics import Metrics, StringMetricName, Weighted  # noqa: E402
from pfl.model.pytorch import PyTorchModel  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from bench.plain_fedavg import Split, load_work, report, shuffle_seed  # noqa: E402
from medflower.smallcnn import SmallCNN  # noqa: E402

TEST = "test"


class PflSmallCNN(SmallCNN):
    """medflower's small CNN with the ``loss`` and ``metrics`` methods pfl's ``PyTorchModel`` calls.

    Same constructor, so after the same ``torch.manual_seed`` it holds the plain loop's initial weights.
    ``metrics`` returns per-class hits as :class:`pfl.metrics.Weighted` values, which pfl sums over batches,
    so that balanced accuracy (mean recall over the classes present) comes out of pfl's own evaluation.
    """

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.train()
        return F.cross_entropy(self(x), y)

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Weighted]:
        self.eval()
        pred = self(x).argmax(1)
        out = {"accuracy": Weighted(int((pred == y).sum()), len(y))}
        for c in range(self.head.out_features):
            mask = y == c
            out[f"recall {c}"] = Weighted(int((pred[mask] == c).sum()), int(mask.sum()))
        return out


def final_metrics(metrics: Metrics, prefix: str, classes: int) -> dict[str, float]:
    """Accuracy and balanced accuracy from the Weighted values ``PflSmallCNN.metrics`` produced."""
    recalls = [metrics[f"{prefix}recall {c}"] for c in range(classes)]
    present = [r.overall_value for r in recalls if r.weight > 0]
    return {"accuracy": metrics[f"{prefix}accuracy"].overall_value, "balanced-accuracy": sum(present) / len(present)}


def plain_order(n: int, seed: int) -> torch.Tensor:
    """The order in which the plain loop's shuffling ``DataLoader`` seeded with ``seed`` visits ``n`` images.

    Drawn by such a ``DataLoader`` over the indices, not by ``torch.randperm`` alone: the loader takes a
    base seed from the generator before its sampler draws the permutation.
    """
    loader = DataLoader(range(n), batch_size=max(n, 1), shuffle=True, generator=torch.Generator().manual_seed(seed))
    return next(iter(loader)) if n else torch.zeros(0, dtype=torch.int64)


class LastMetrics(TrainingProcessCallback):
    """Keeps the metrics of the latest central iteration after the first (the callbacks before it included).

    Not the first: pfl's central evaluation callbacks skip it, and its aggregate carries their
    evaluations from before training instead.
    """

    def __init__(self) -> None:
        self.metrics = Metrics()

    def after_central_iteration(
        self, aggregate_metrics: Metrics, model: Any, *, central_iteration: int
    ) -> tuple[bool, Metrics]:
        if central_iteration > 0:
            self.metrics = aggregate_metrics
        return False, Metrics()


def main(npz_path: str, spec_path: str) -> None:
    t0 = time.time()
    spec, sites, test = load_work(npz_path, spec_path)
    rounds, seed = spec["rounds"], spec["seed"]
    torch.manual_seed(seed)
    net = PflSmallCNN(**spec["model"])
    model = PyTorchModel(
        model=net,
        local_optimizer_create=torch.optim.Adam,
        central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
    )
    calls = [0] * len(sites)

    def site_dataset(i: int) -> Dataset:
        """Site ``i``'s training split in the order the plain loop's DataLoader draws for this round."""
        calls[i] += 1
        x, y = sites[i]["train"]
        perm = plain_order(len(x), shuffle_seed(seed, calls[i], i))
        return Dataset((x[perm], y[perm]), user_id=str(i))

    # A site without training images adds nothing to a sample-weighted average (the plain loop gives it
    # weight 0), and pfl cannot evaluate an empty dataset in iteration 0: it is left out of the cohort.
    trainers = [i for i, s in enumerate(sites) if len(s["train"][0])]
    train = FederatedDataset(site_dataset, get_user_sampler("minimize_reuse", trainers))
    # No federated val population (val_cohort_size 0): see the module docstring.
    backend = SimulatedBackend(training_data=train, val_data=None, postprocessors=[WeightByDatapoints()])
    eval_params = NNEvalHyperParams(local_batch_size=spec["eval_batch_size"])

    def central(split: Split, name: str) -> CentralEvaluationCallback:
        return CentralEvaluationCallback(
            Dataset(split), eval_params, format_fn=lambda n: StringMetricName(f"{name} | {n}")
        )

    callbacks: list[TrainingProcessCallback] = [central(test, TEST)]
    callbacks += [central(s["val"], f"site {i} val") for i, s in enumerate(sites) if len(s["val"][0])]
    last = LastMetrics()
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=rounds,
            evaluation_frequency=rounds,
            train_cohort_size=len(trainers),
            val_cohort_size=0,
        ),
        backend=backend,
        model=model,
        model_train_params=NNTrainHyperParams(
            local_batch_size=spec["batch_size"],
            local_num_epochs=spec["local_epochs"],
            local_learning_rate=spec["lr"],
        ),
        model_eval_params=eval_params,
        callbacks=[*callbacks, last],
    )
    classes = spec["model"]["out_channels"]
    prefix = f"{TEST} | "
    metrics = last.metrics if f"{prefix}accuracy" in last.metrics else None
    if metrics is None:  # one round: pfl's callback skips evaluating after central iteration 0
        metrics = model.evaluate(Dataset(test), lambda n: StringMetricName(prefix + n), eval_params)
    final = final_metrics(metrics, prefix, classes)
    for s in sites:
        if len(s["test"][0]):
            model.evaluate(Dataset(s["test"]), eval_params=eval_params)
    report(final, t0)


if __name__ == "__main__":
    main(*sys.argv[1:3])
