"""How good are a prior's frozen features? A pooled, non-private linear probe, side by side for two input ranges.

    python bench/prior_probe.py EXPERIMENT.yaml PRIOR.pt [--c 0.01 0.1 1 10]

Builds ``EXPERIMENT``'s network exactly as a run does, loads ``PRIOR.pt``'s trunk (a ``medflower prior`` file,
whitened or not: a logistic regression does not care) and extracts the trunk's features of every train / val /
test image of the experiment's data set, prepared as the run prepares them. Then, on all training images in
one place (no federation, no DP), it standardises each feature by the training images' mean and sd, fits an
L2-regularised logistic regression for each inverse strength ``C`` (full-batch L-BFGS), keeps the ``C`` with the
best validation AUC, and prints its validation and test AUC. Standardised, because an L2 penalty on the raw pooled
features is a penalty on their scale: until stage 29 the probe fitted raw features and under-reported
VesselMNIST3D's ceiling (test 0.764 raw, 0.815 standardised, the same trunk). It does this twice:
with the images as the data preparation gives them ("as prepared", e.g. [-1, 1] for MedMNIST) and remapped
to [0, 1] ("as [0, 1]"), the range in which `medflower prior` rendered its synthetic images before it learned
to render them in the data's own intensities (stage 20 in bench/RESULTS.md).

Why: the federated DP probe can only approach what the features allow; this is the ceiling, measured in
a minute instead of a sweep. Binary classification only. Not a test, not a benchmark of speed.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from medflower.config import ExperimentConfig, load_experiment
from medflower.data.base import DatasetSplits
from medflower.data.registry import load_dataset
from medflower.metrics import roc_auc
from medflower.modelspec import build_experiment_model
from medflower.prior import last_linear, load_trunk


def features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i : i + 256]).flatten(1) for i in range(0, len(x), 256)])


def trunk_and_data(experiment: Path, prior: Path) -> tuple[ExperimentConfig, DatasetSplits, torch.nn.Module]:
    """The experiment (its model unwhitened, unfrozen), its data set, and its network with ``prior``'s trunk loaded
    and the head set aside (the trunk's features come out), in eval mode. Also used by bench/dp_head_sim.py."""
    exp = load_experiment(experiment)
    exp = replace(exp, model=replace(exp.model, whiten_features=False, freeze=(), init=None))
    model = build_experiment_model(exp)
    load_trunk(model, torch.load(prior, map_location="cpu", weights_only=True))
    parent, attr = last_linear(model)
    setattr(parent, attr, torch.nn.Identity())
    return exp, load_dataset(exp), model.eval()


def fit_logistic(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.nn.Linear:
    """L2-regularised logistic regression (sklearn's parametrisation: loss sum + ||w||^2 / (2C))."""
    lin = torch.nn.Linear(x.shape[1], 1).double()
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=500, line_search_fn="strong_wolfe")
    xd, yd = x.double(), y.double()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(lin(xd).squeeze(1), yd, reduction="sum")
        loss = loss + lin.weight.pow(2).sum() / (2 * c)
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment", type=Path)
    ap.add_argument("prior", type=Path)
    ap.add_argument("--c", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0])
    args = ap.parse_args()
    exp, data, model = trunk_and_data(args.experiment, args.prior)
    xs = {k: torch.from_numpy(data.split(k).images) for k in ("train", "val", "test")}
    ys = {k: torch.from_numpy(data.split(k).targets).long() for k in ("train", "val", "test")}
    if int(max(int(y.max()) for y in ys.values())) > 1:
        raise SystemExit("bench/prior_probe.py: binary classification only")
    lo, hi = min(float(x.min()) for x in xs.values()), max(float(x.max()) for x in xs.values())
    print(f"{args.prior}: features of {exp.data.path} ({', '.join(f'{k} {len(v)}' for k, v in xs.items())})")
    print(f"prepared pixel range [{lo:.2f}, {hi:.2f}]")
    print("| inputs | features | C (best val) | val AUC | test AUC |\n|---|---|---|---|---|")
    for label, remap in (("as prepared", lambda x: x), ("as [0, 1]", lambda x: (x - lo) / (hi - lo))):
        f = {k: features(model, remap(x)) for k, x in xs.items()}
        mu, sd = f["train"].mean(0), f["train"].std(0).clamp_min(1e-6)
        f = {k: (v - mu) / sd for k, v in f.items()}
        best = None
        for c in args.c:
            lin = fit_logistic(f["train"], ys["train"], c)
            with torch.no_grad():
                val = roc_auc(lin(f["val"].double()).squeeze(1), ys["val"])
                test = roc_auc(lin(f["test"].double()).squeeze(1), ys["test"])
            if best is None or val > best[1]:
                best = (c, val, test)
        assert best is not None
        print(f"| {label} | {f['train'].shape[1]} | {best[0]:g} | {best[1]:.3f} | {best[2]:.3f} |", flush=True)


if __name__ == "__main__":
    main()
