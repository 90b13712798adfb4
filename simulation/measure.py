"""Measured shift between simulated sites: sizes, case mix, intensities, and site identifiability.

A configured shift is a promise; these numbers check it. The site-identifiability score is the
balanced accuracy of a small CNN trained to tell which site an image comes from (trained on the
sites' training images, scored on their held-out test images). Chance is ``1/N`` whatever the site
sizes (balanced accuracy, class-weighted loss). Label skew alone can make sites identifiable (a site
of mostly one class looks like that class), so the score measures the total shift a model can see,
not only the scanner's. Nothing here is in Flower or MONAI; the classifier is medflower's own
``SmallCNN`` and the metrics are :func:`medflower.metrics.classification_metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from medflower.metrics import classification_metrics
from medflower.simulation.sites import SPLITS, SiteData
from medflower.smallcnn import SmallCNN


def site_sizes(sites: Sequence[SiteData]) -> dict[str, dict[str, int]]:
    return {s.name: {n: len(s.split(n)) for n in SPLITS} for s in sites}


def label_histograms(sites: Sequence[SiteData], num_classes: int) -> dict[str, dict[str, list[int]]]:
    """Per site and split, the count of each class (classification only)."""
    out = {}
    for s in sites:
        out[s.name] = {
            n: np.bincount(s.split(n).targets.astype(np.int64), minlength=num_classes)[:num_classes].tolist()
            for n in SPLITS
            if s.split(n).targets.ndim == 1
        }
    return out


def intensity_stats(sites: Sequence[SiteData]) -> dict[str, dict[str, float]]:
    """Per site, pixel statistics over all its images (all splits): what a scanner shift moves."""
    out = {}
    for s in sites:
        px = np.concatenate([s.split(n).images.reshape(-1) for n in SPLITS])
        if px.size == 0:
            out[s.name] = dict.fromkeys(("mean", "std", "p01", "p50", "p99", "image_std"), math.nan)
            continue
        p01, p50, p99 = np.percentile(px, [1, 50, 99])
        images = np.concatenate([s.split(n).images for n in SPLITS])
        out[s.name] = {
            "mean": float(px.mean()),
            "std": float(px.std()),
            "p01": float(p01),
            "p50": float(p50),
            "p99": float(p99),
            # within-image spread, averaged over images (contrast; noise raises it, blur lowers it)
            "image_std": float(images.reshape(len(images), -1).std(axis=1).mean()),
        }
    return out


def intensity_histograms(sites: Sequence[SiteData], bins: int = 50) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Common bin edges and per-site normalised pixel histograms (fractions of pixels)."""
    pix = {s.name: np.concatenate([s.split(n).images.reshape(-1) for n in SPLITS]) for s in sites}
    allpx = np.concatenate([p for p in pix.values() if p.size]) if any(p.size for p in pix.values()) else np.zeros(1)
    lo, hi = np.percentile(allpx, [0.1, 99.9])
    edges = np.linspace(float(lo), float(hi) if hi > lo else float(lo) + 1.0, bins + 1)
    hists = {}
    for name, p in pix.items():
        h, _ = np.histogram(np.clip(p, edges[0], edges[-1]), bins=edges)
        hists[name] = h / max(h.sum(), 1)
    return edges, hists


def site_identifiability(
    sites: Sequence[SiteData],
    *,
    seed: int = 0,
    epochs: int = 8,
    width: int = 8,
    batch_size: int = 64,
    lr: float = 3e-3,
    max_per_site: int = 600,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Train a small CNN to predict the site of an image; score it on held-out images.

    Training images: each site's train split (at most ``max_per_site``, seeded subsample); held-out:
    each site's test split (val too if a site has no test images). Returns balanced accuracy (the
    score: chance is 1/N), accuracy, the chance level, sizes and the confusion matrix (rows: true site).
    The classifier trains on ``device`` (default: the CPU), in float32: it is small, and its score
    should not depend on the precision an experiment trains in.
    """
    device = device or torch.device("cpu")
    n_sites = len(sites)
    if n_sites < 2:
        return {"balanced_accuracy": math.nan, "chance": 1.0, "note": "needs at least two sites"}
    rng = np.random.default_rng([seed, 4049])

    def gather(split_names: tuple[str, ...], cap: int | None) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for i, s in enumerate(sites):
            imgs = next((s.split(n).images for n in split_names if len(s.split(n))), s.train.images[:0])
            if cap is not None and len(imgs) > cap:
                imgs = imgs[np.sort(rng.choice(len(imgs), size=cap, replace=False))]
            xs.append(imgs)
            ys.append(np.full(len(imgs), i, dtype=np.int64))
        return np.concatenate(xs).astype(np.float32), np.concatenate(ys)

    x_tr, y_tr = gather(("train",), max_per_site)
    x_te, y_te = gather(("test", "val"), None)
    if len(x_te) == 0 or len(np.unique(y_tr)) < 2:
        return {"balanced_accuracy": math.nan, "chance": 1.0 / n_sites, "note": "too few images"}
    torch.manual_seed(seed)
    model = SmallCNN(spatial_dims=x_tr.ndim - 2, in_channels=x_tr.shape[1], out_channels=n_sites, width=width).to(
        device
    )
    counts = np.bincount(y_tr, minlength=n_sites).astype(np.float32)
    weights = torch.from_numpy(np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / n_sites, 0.0)).float()
    loss_fn = nn.CrossEntropyLoss(weight=weights.to(device))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x_tr).to(device), torch.from_numpy(y_tr).to(device)  # small: resident on the device
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen).to(device)
        for i in range(0, len(order), batch_size):
            b = order[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xt[b]), yt[b]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        logits = torch.cat(
            [model(torch.from_numpy(x_te[i : i + 256]).to(device)).cpu() for i in range(0, len(x_te), 256)]
        )
    m = classification_metrics(logits, torch.from_numpy(y_te))
    pred = logits.argmax(1).numpy()
    confusion = np.zeros((n_sites, n_sites), dtype=int)
    np.add.at(confusion, (y_te, pred), 1)
    return {
        "balanced_accuracy": m["balanced-accuracy"],
        "accuracy": m["accuracy"],
        "auc": m["auc"],
        "chance": 1.0 / n_sites,
        "n_train": len(x_tr),
        "n_heldout": len(x_te),
        "epochs": epochs,
        "confusion": confusion.tolist(),
        "sites": [s.name for s in sites],
    }


def measure_shift(
    sites: Sequence[SiteData],
    *,
    num_classes: int | None,
    seed: int = 0,
    identifiability: bool = True,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Everything above in one JSON-ready dict (the identifiability classifier trains on ``device``)."""
    out: dict[str, Any] = {
        "sizes": site_sizes(sites),
        "intensity": intensity_stats(sites),
        "sites": {s.name: s.info for s in sites},
    }
    if num_classes is not None:
        out["labels"] = label_histograms(sites, num_classes)
    if identifiability:
        out["identifiability"] = site_identifiability(sites, seed=seed, device=device)
    return out
