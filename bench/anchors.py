"""Issue 12 item 6: anchor medflower's zoo to published MedMNIST v2 numbers, trained centrally (pooled).

    python bench/anchors.py breastmnist                  # ResNet-18 (28), MedMNIST v2's recipe
    python bench/anchors.py retinamnist --epochs 30      # a shorter schedule (say so when reporting it)
    python bench/anchors.py vesselmnist3d --model cnn    # a 3D anchor

The recipe is MedMNIST v2's (Yang et al., Scientific Data 2023, "Experiments"): the official train split,
Adam lr 1e-3, batch 128, cross-entropy, ``--epochs`` (the paper: 100) with the learning rate divided by
10 at 50 % and 75 % of them, no augmentation, and the epoch with the best validation AUC scored on the
test split (the last epoch is printed too). The network is medflower's zoo entry (``--model``; the
ResNet keeps MedMNIST's small-input stem: 3x3 first convolution, stride 1, no max pool), with
BatchNorm as in the paper (``--norm``; medflower's default is GroupNorm, which DP-SGD needs).

``PUBLISHED`` holds the paper's test AUC and accuracy of ResNet-18 (28) for the 2D sets and of
ResNet-18 + 3D for the 3D sets, all at 28 px (AdrenalMNIST3D is stored here at 64³, MedMNIST+'s size:
the comparison says so). Each run appends a JSON line to ``--record``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a script: the checkout's medflower, installed or not
SHARED = Path(os.environ.get("MEDFLOWER_SHARED_DATA", REPO.parent / "shared" / "data"))

from medflower.config import ExperimentConfig  # noqa: E402  (after the sys.path line above)
from medflower.metrics import classification_metrics  # noqa: E402

# MedMNIST v2 (Yang et al., Scientific Data 10, 41, 2023), Table 3 (2D: ResNet-18 (28)) and Table 4
# (3D: ResNet-18 + 3D), test AUC and ACC
PUBLISHED: dict[str, dict[str, float]] = {
    "breastmnist": {"auc": 0.901, "accuracy": 0.863},
    "retinamnist": {"auc": 0.717, "accuracy": 0.524},
    "adrenalmnist3d": {"auc": 0.827, "accuracy": 0.721},
    "vesselmnist3d": {"auc": 0.874, "accuracy": 0.877},
}
FILES = {
    "breastmnist": "breastmnist.npz",
    "retinamnist": "retinamnist.npz",
    "adrenalmnist3d": "adrenalmnist3d_64.npz",
    "vesselmnist3d": "vesselmnist3d.npz",
}


def experiment(
    dataset: str, model: str, norm: str, seed: int, size: int | None = None, params: dict[str, Any] | None = None
) -> ExperimentConfig:
    """The data set and the zoo model as an experiment (one site holding everything: pooled training).

    ``size`` resizes every image to that many pixels per axis (``data.size``): AdrenalMNIST3D is stored
    here at 64³ and the paper's numbers are at 28³.
    """
    spatial_dims = 3 if dataset.endswith("3d") else 2
    data: dict[str, Any] = {"kind": "medmnist", "path": str(SHARED / "medmnist" / FILES[dataset])}
    if size is not None:
        data["size"] = [size] * spatial_dims
    return ExperimentConfig.from_dict(
        {
            "name": f"anchor-{dataset}-{model}",
            "seed": seed,
            "data": data,
            "partition": {"kind": "iid", "num_sites": 1},
            "model": {"name": model, "norm": norm, "spatial_dims": spatial_dims, "params": params or {}},
            "train": {"rounds": 1, "batch_size": 128, "optimizer": "adam", "lr": 1e-3},
        }
    )


def logits_of(model: torch.nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Logits on the CPU, computed where the model is."""
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        return torch.cat([model(images[i : i + batch].to(device)).float().cpu() for i in range(0, len(images), batch)])


def train(exp: ExperimentConfig, *, epochs: int) -> dict[str, Any]:
    from medflower.client.train import make_loader, train_epochs
    from medflower.data import load_dataset
    from medflower.device import pin_memory, resolve_amp
    from medflower.modelspec import build_experiment_model

    amp = resolve_amp(exp.train.device, exp.train.precision)  # train.device auto: CUDA when present
    ds = load_dataset(exp)
    torch.manual_seed(exp.seed)
    model = build_experiment_model(exp).to(amp.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=exp.train.lr)
    milestones = [round(0.5 * epochs), round(0.75 * epochs)]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    loader = make_loader(ds.train, exp.train.batch_size, exp.seed, pin_memory=pin_memory(amp.device))
    val_x, val_y = torch.from_numpy(ds.val.images), torch.from_numpy(ds.val.targets.reshape(-1)).long()
    best: tuple[float, int, dict[str, torch.Tensor]] = (-math.inf, 0, {})
    curve = []
    t0 = time.time()
    for epoch in range(1, epochs + 1):
        stats = train_epochs(model, loader, optimizer, epochs=1, task=exp.task, amp=amp)
        scheduler.step()
        val = classification_metrics(logits_of(model, val_x), val_y)
        curve.append({"epoch": epoch, "train_loss": stats.loss, "val_auc": val["auc"]})
        took = time.time() - t0
        print(f"epoch {epoch:3d}: train loss {stats.loss:.4f}  val AUC {val['auc']:.4f}  ({took:.0f}s)", flush=True)
        if val["auc"] > best[0]:
            best = (val["auc"], epoch, copy.deepcopy(model.state_dict()))
    test_x, test_y = torch.from_numpy(ds.test.images), torch.from_numpy(ds.test.targets.reshape(-1)).long()
    last = classification_metrics(logits_of(model, test_x), test_y)
    model.load_state_dict(best[2])
    at_best = classification_metrics(logits_of(model, test_x), test_y)
    return {
        "best_val_auc": best[0],
        "best_epoch": best[1],
        "test_at_best_val": at_best,
        "test_last_epoch": last,
        "curve": curve,
        "train_images": len(ds.train),
        "seconds": time.time() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=sorted(FILES))
    p.add_argument("--model", default="resnet18", help="a zoo classifier (medflower.models.CLASSIFIERS)")
    p.add_argument("--norm", default="batch", choices=["batch", "group", "instance"])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None, help="resize images to this many pixels per axis (data.size)")
    p.add_argument("--params", default="{}", help="model.params as JSON, e.g. '{\"width\": 32}'")
    p.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--record", default=str(REPO / "bench" / "results" / "anchors.jsonl"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    exp = experiment(args.dataset, args.model, args.norm, args.seed, args.size, json.loads(args.params))
    result = train(exp, epochs=args.epochs)
    pub = PUBLISHED[args.dataset]
    got = result["test_at_best_val"]
    print(
        f"{args.dataset} {args.model} ({args.norm} norm), {args.epochs} epochs, seed {args.seed}: test AUC "
        f"{got['auc']:.3f} (published {pub['auc']:.3f}, difference {100 * (got['auc'] - pub['auc']):+.1f} points), "
        f"accuracy {got['accuracy']:.3f} (published {pub['accuracy']:.3f}); "
        f"best validation epoch {result['best_epoch']}"
    )
    record = {"dataset": args.dataset, "model": args.model, "norm": args.norm, "epochs": args.epochs, "seed": args.seed}
    record |= {"size": args.size, "params": json.loads(args.params)}
    record |= {"published": pub, **result}
    with open(args.record, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
