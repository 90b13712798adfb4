"""Why a DP-SGD head on a prior's frozen features stops short: a pooled DP-SGD simulation, with and without noise.

    python bench/dp_head_sim.py EXPERIMENT.yaml PRIOR.pt [--epochs 120] [--batch-size 96] [--lr 0.1 0.3 1 3]

Builds ``EXPERIMENT``'s network, loads ``PRIOR.pt``'s trunk (a ``medflower prior`` file, whitened or not) and takes the
trunk's features of every train / val / test image, prepared as a run prepares them. Then it trains a linear
softmax head on all training images in one place (no federation) by DP-SGD as Opacus does it: Poisson sampling
at rate batch/n, each per-sample gradient clipped to norm 1, Gaussian noise of the multiplier Opacus' RDP
accountant gives for epsilon 8 (delta 1e-5) over the whole run, plain SGD at ``lr`` from a zero head. Each
input map of the features is run at each ``lr``, 3 noise seeds, and once without noise (clipping only):

- ``raw``: the features as the trunk gives them;
- ``syn-white``: whitened by :func:`medflower.prior.whitening` fitted on the trunk's features of synthetic images
  (what ``model.whiten_features`` does, shrinkage 0.1), and the shrinkage 0 and 1 variants;
- ``real-std``: standardised per feature by the training images' own mean and sd, an oracle (a private run cannot
  use these statistics without spending budget on them);
- ``private-std``: the same standardisation from statistics released under DP, what the oracle costs when paid
  for. ``--sites`` sites each release two Gaussian sums of their share of the training features: the features
  clipped to the synthetic features' 99th-percentile norm (their sum gives the mean), then the squares of the
  features minus that noisy mean, clipped to the synthetic features' median centred norm (their sum gives the
  variance, floored at 0.1 of its mean). Each release has noise multiplier ``--stats-sigma`` on its L2
  sensitivity, the two are composed with the DP-SGD steps in one RDP ledger, and DP-SGD's multiplier is raised
  until the whole stays at epsilon 8. Simulated in one place (the sites' noise summed), not federated.
- ``white+private-std``: ``syn-white (0.1)``, then the same private standardisation of the whitened features, with
  medflower's own functions and bounds (:mod:`medflower.featurestats`: the bounds read off the whitened synthetic
  features): what ``privacy.feature_stats_noise`` does in a federation (stage 31).

It prints validation and test AUC, mean over the noise seeds, and the noise-free run's. Why: the federated
sweeps take minutes per run; this shows in seconds whether the head is limited by the noise or by the
optimisation (the noise-free column), and which input map trains faster. Binary tasks; not a test, not a
benchmark of speed; the numbers of bench/RESULTS.md stage 24.
"""

from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from opacus.accountants.rdp import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from prior_probe import features, trunk_and_data  # bench/, beside this script

from medflower.featurestats import clipping_bounds, noised_sum, spread_from
from medflower.metrics import roc_auc
from medflower.prior import synthetic_features, whitening

Map = Callable[[torch.Tensor], torch.Tensor]


def dp_sgd_head(
    x: dict[str, torch.Tensor],
    y: dict[str, torch.Tensor],
    *,
    lr: float,
    batch_size: int,
    steps: int,
    sigma: float,
    seed: int,
    clip: float = 1.0,
) -> tuple[float, float]:
    """(val AUC, test AUC) of a softmax head trained by DP-SGD on ``x['train']`` (closed-form per-sample grads)."""
    gen = torch.Generator().manual_seed(seed)
    n, classes = len(x["train"]), int(y["train"].max()) + 1
    xt = torch.cat([x["train"], torch.ones(n, 1)], 1)
    w = torch.zeros(xt.shape[1], classes)
    q = batch_size / n
    for _ in range(steps):
        take = torch.rand(n, generator=gen) < q
        xb, yb = xt[take], y["train"][take]
        err = torch.softmax(xb @ w, 1)
        err[torch.arange(len(yb)), yb] -= 1
        g = xb[:, :, None] * err[:, None, :]
        g = g * (clip / g.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)[:, None, None]
        w -= lr * (g.sum(0) + torch.randn(w.shape, generator=gen) * sigma * clip) / batch_size
    out = []
    for k in ("val", "test"):
        s = torch.cat([x[k], torch.ones(len(x[k]), 1)], 1) @ w
        out.append(roc_auc(s[:, 1] - s[:, 0], y[k]))
    return out[0], out[1]


def rdp_epsilon(entries: list[tuple[float, float, int]], delta: float = 1e-5) -> float:
    """Epsilon of (noise multiplier, sampling rate, steps) entries composed by Opacus' RDP accountant (the
    history a site's ledger keeps, medflower.client.privacy)."""
    acc = RDPAccountant()
    acc.history = list(entries)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def sgd_sigma(before: list[tuple[float, float, int]], q: float, steps: int, epsilon: float = 8.0) -> float:
    """DP-SGD's noise multiplier that brings ``before`` plus ``steps`` steps at rate ``q`` to ``epsilon``."""
    lo, hi = 0.1, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rdp_epsilon([*before, (mid, q, steps)]) > epsilon else (lo, mid)
    return hi


def clip_rows(x: torch.Tensor, bound: float) -> torch.Tensor:
    return x * (bound / x.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)


def private_standardisation(
    train: torch.Tensor, syn: torch.Tensor, *, sigma: float, sites: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, sd) of ``train``'s features from two Gaussian sums, clipped at bounds read off the synthetic
    features ``syn`` only (no data spent on choosing them); the sites' independent noises add up to
    ``sqrt(sites)`` times one site's. The second sum's sensitivity is the squared bound: ||z**2|| <= ||z||**2.
    The count is not noised: it is public here as in medflower's DP-SGD plan, which sets the sampling rate from
    each site's number of training images."""
    n, d = train.shape
    c1 = float(syn.norm(dim=1).quantile(0.99))
    c2 = float((syn - syn.mean(0)).norm(dim=1).median())
    noise = lambda scale: torch.randn(d, generator=gen) * sigma * scale * math.sqrt(sites)  # noqa: E731
    mean = (clip_rows(train, c1).sum(0) + noise(c1)) / n
    var = ((clip_rows(train - mean, c2) ** 2).sum(0) + noise(c2**2)).clamp_min(0.0) / n
    return mean, (var + 0.1 * var.mean()).clamp_min(1e-12).sqrt()


def white_private_standardisation(
    white: Map, train: torch.Tensor, syn: torch.Tensor, *, sigma: float, sites: int, gen: torch.Generator
) -> Map:
    """``white`` followed by a standardisation from the two releases of :mod:`medflower.featurestats`, as
    ``privacy.feature_stats_noise`` makes them: bounds from the whitened synthetic features, one release per site
    (their noises add up), the federation's mean, then the squared deviations from it."""
    wt, ws = white(train), white(syn)
    b_mean, b_var = clipping_bounds(ws)
    parts = torch.arange(len(wt)) % sites  # the sites' shares (which image goes where does not matter to a sum)

    def release(stage: str, bound: float, centre: torch.Tensor | None = None) -> torch.Tensor:
        return sum(  # type: ignore[return-value]
            noised_sum(wt[parts == k], stage=stage, bound=bound, noise_multiplier=sigma, generator=gen, centre=centre)
            for k in range(sites)
        )

    centre = release("mean", b_mean) / len(wt)
    scale = spread_from(release("var", b_var, centre) / len(wt))
    return lambda f: ((white(f).double() - centre) / scale).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment", type=Path)
    ap.add_argument("prior", type=Path)
    ap.add_argument("--epochs", type=float, default=120.0, help="passes over the pooled training set (default 120)")
    ap.add_argument("--batch-size", type=int, default=96, help="expected batch (default 96)")
    ap.add_argument("--lr", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0])
    ap.add_argument("--synthetic", type=int, default=2048, help="synthetic images for the whitening (default 2048)")
    ap.add_argument("--stats-sigma", type=float, nargs="*", default=[4.0], help="private-std noise multipliers")
    ap.add_argument("--sites", type=int, default=3, help="sites adding noise to private-std's sums (default 3)")
    args = ap.parse_args()
    exp, data, model = trunk_and_data(args.experiment, args.prior)
    feats = {k: features(model, torch.from_numpy(data.split(k).images)) for k in ("train", "val", "test")}
    ys = {k: torch.from_numpy(data.split(k).targets).long().view(-1) for k in feats}
    syn = synthetic_features(model, exp, samples=args.synthetic, generator=torch.Generator().manual_seed(123))
    mu, sd = feats["train"].mean(0), feats["train"].std(0)

    def white(shrinkage: float) -> Map:
        m, t = whitening(syn, shrinkage=shrinkage)
        return lambda f: (f - m) @ t

    n = len(feats["train"])
    steps = int(args.epochs * n / args.batch_size)
    q = args.batch_size / n
    # Opacus' search for the maps that spend nothing on statistics (as in stages 24-29)
    sigma = get_noise_multiplier(target_epsilon=8.0, target_delta=1e-5, sample_rate=q, steps=steps, accountant="rdp")
    # each input map with the DP-SGD noise multiplier left to it by whatever its statistics spent
    maps: dict[str, tuple[Map, float]] = {
        "raw": (lambda f: f, sigma),
        "syn-white (0.1)": (white(0.1), sigma),
        "syn-white (0)": (white(0.0), sigma),
        "syn-white (1)": (white(1.0), sigma),
        "real-std (oracle)": (lambda f: (f - mu) / sd, sigma),
    }
    for s in args.stats_sigma:
        m, v = private_standardisation(
            feats["train"], syn, sigma=s, sites=args.sites, gen=torch.Generator().manual_seed(7)
        )
        stats = [(s, 1.0, 2)]  # two full-data Gaussian releases
        maps[f"private-std (stats sigma {s:g}, eps {rdp_epsilon(stats):.2f} alone)"] = (
            lambda f, m=m, v=v: (f - m) / v,
            sgd_sigma(stats, q, steps),
        )
    for s in args.stats_sigma:
        fmap = white_private_standardisation(
            white(0.1), feats["train"], syn, sigma=s, sites=args.sites, gen=torch.Generator().manual_seed(7)
        )
        maps[f"white+private-std (stats sigma {s:g})"] = (fmap, sgd_sigma([(s, 1.0, 2)], q, steps))
    norm = feats["train"].norm(dim=1).mean().item()
    centred = (feats["train"] - mu).norm(dim=1).mean().item()
    print(f"{args.prior} on {exp.data.path}: {n} training images, {feats['train'].shape[1]} features")
    print(f"mean feature norm {norm:.2f}, of the mean vector {mu.norm():.2f}, centred {centred:.2f}")
    print(f"DP-SGD: expected batch {args.batch_size}, {steps} steps, noise multiplier {sigma:.2f} (epsilon 8)")
    print("| input map | DP-SGD sigma | lr | val AUC (DP) | test AUC (DP) | val AUC (no noise) | test AUC (no noise) |")
    print("|---|---|---|---|---|---|---|")
    for name, (fmap, map_sigma) in maps.items():
        x = {k: fmap(v) for k, v in feats.items()}
        for lr in args.lr:
            runs = [
                dp_sgd_head(x, ys, lr=lr, batch_size=args.batch_size, steps=steps, sigma=map_sigma, seed=s)
                for s in range(3)
            ]
            clean = dp_sgd_head(x, ys, lr=lr, batch_size=args.batch_size, steps=steps, sigma=0.0, seed=0)
            val, test = (sum(r[i] for r in runs) / len(runs) for i in (0, 1))
            row = f"| {name} | {map_sigma:.3f} | {lr:g} | {val:.3f} | {test:.3f} | {clean[0]:.3f} | {clean[1]:.3f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
