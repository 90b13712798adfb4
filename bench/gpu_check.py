"""GPU check: medflower against a plain PyTorch FedAvg loop on a GPU, and a 3D U-Net epoch in fp32 vs bf16.

    python bench/gpu_check.py [--data ../shared/data/medmnist/breastmnist.npz] [--rounds 10] [--sites 5]

Needs a CUDA machine (a CUDA build of torch and a visible GPU); without one it says so and exits
with status 2. Two measurements, printed as markdown for bench/RESULTS.md:

1. **Engine ratio on the GPU.** The same work run twice, back to back, each timed from process
   start to exit: ``medflower simulate`` (Flower's engine, ``train.device: cuda``, the sites
   sharing the GPU through ``simulation.gpus_per_site``) and a plain single-process PyTorch FedAvg
   loop (this file with ``--plain``: numpy, torch and nothing else). Work: BreastMNIST from the
   shared files, ``--sites`` sites (Dirichlet 0.5), a GroupNorm CNN of width 32 (the plain loop
   builds the same layers as medflower's ``cnn``, checked by parameter count), ``--rounds`` rounds x
   1 local epoch, Adam 1e-3, batch 32, and the global model tested after every round. medflower
   also has each site evaluate its validation split every round (as it always does).
2. **3D U-Net site epoch.** One epoch of local training (medflower's own ``train_epochs``, MONAI's
   UNet as medflower's ``unet`` builds it, DiceCE loss) on SYNTHETIC 64^3 volumes with blob masks, in
   fp32 and in bf16 autocast, timed with ``torch.cuda.synchronize``; peak GPU memory of each.

``--device cpu`` runs everything on the CPU instead: a dry run that checks the script, not a
measurement of anything the issue asks for.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "medmnist" / "breastmnist.npz"
WIDTH, BATCH, LR, ALPHA, SEED = 32, 32, 1e-3, 0.5, 0


def no_cuda_message() -> str | None:
    """Why this machine cannot run the GPU check (None: it can)."""
    import torch

    if torch.cuda.is_available():
        return None
    build = "a CPU-only build" if torch.version.cuda is None else f"built with CUDA {torch.version.cuda}"
    return (
        f"gpu_check: no CUDA device here (torch {torch.__version__}, {build}); run it on a machine with an "
        "NVIDIA GPU and a CUDA build of torch (deploy/Dockerfile's TORCH_VARIANT=cu126), or pass --device cpu "
        "for a dry run of the script"
    )


# ---- the plain loop: numpy and torch only --------------------------------------------------------------


def plain_cnn(in_channels: int, classes: int, width: int = WIDTH) -> Any:
    """medflower's ``cnn`` (3 stages of conv-GroupNorm-ReLU, max pooling between, a linear head), in plain torch."""
    from torch import nn

    layers: list[nn.Module] = []
    c_in = in_channels
    for i, c_out in enumerate((width, width * 2, width * 4)):
        layers += [*([nn.MaxPool2d(2)] if i else []), nn.Conv2d(c_in, c_out, 3, padding=1)]
        layers += [nn.GroupNorm(min(8, c_out), c_out), nn.ReLU()]
        c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes))


def dirichlet_sites(labels: Any, sites: int, alpha: float, seed: int) -> list[Any]:
    """Indices of each site: per class, Dirichlet(alpha) shares (the same skew medflower's partition draws)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(sites)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = (np.cumsum(rng.dirichlet([alpha] * sites))[:-1] * len(idx)).astype(int)
        for s, chunk in enumerate(np.split(idx, cuts)):
            parts[s] += chunk.tolist()
    return [np.array(sorted(p), dtype=np.int64) for p in parts]


def plain_fedavg(data: Path, *, sites: int, rounds: int, device: str) -> dict[str, float]:
    """FedAvg in one process: every site trains in turn, the weighted mean becomes the global model."""
    import numpy as np
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    npz = np.load(data)
    x = torch.from_numpy(npz["train_images"].astype(np.float32)[:, None] / 255.0)
    y = torch.from_numpy(npz["train_labels"].reshape(-1).astype(np.int64))
    xt = torch.from_numpy(npz["test_images"].astype(np.float32)[:, None] / 255.0).to(device)
    yt = torch.from_numpy(npz["test_labels"].reshape(-1).astype(np.int64)).to(device)
    x, y = x.to(device), y.to(device)  # small: resident on the device
    parts = [torch.from_numpy(p).to(device) for p in dirichlet_sites(y.cpu().numpy(), sites, ALPHA, SEED)]
    glob = plain_cnn(x.shape[1], int(y.max()) + 1).to(device)
    local = plain_cnn(x.shape[1], int(y.max()) + 1).to(device)
    loss_fn = nn.CrossEntropyLoss()
    acc = float("nan")
    for _ in range(rounds):
        total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in glob.state_dict().items()}
        for part in parts:
            local.load_state_dict(glob.state_dict())
            opt = torch.optim.Adam(local.parameters(), lr=LR)
            local.train()
            for b in part[torch.randperm(len(part), device=device)].split(BATCH):
                opt.zero_grad(set_to_none=True)
                loss_fn(local(x[b]), y[b]).backward()
                opt.step()
            for k, v in local.state_dict().items():
                total[k] += v.float() * (len(part) / len(y))
        glob.load_state_dict(total)
        glob.eval()
        with torch.no_grad():
            acc = float((glob(xt).argmax(1) == yt).float().mean())
    return {"test_accuracy": acc}


# ---- the two runs, timed from process start to exit ------------------------------------------------------


def experiment_yaml(data: Path, *, sites: int, rounds: int, device: str) -> dict[str, Any]:
    return {
        "name": "gpu-check",
        "seed": SEED,
        "data": {"kind": "medmnist", "path": str(data.resolve())},
        "partition": {"kind": "dirichlet", "num_sites": sites, "alpha": ALPHA},
        "model": {"name": "cnn", "params": {"width": WIDTH}},
        "train": {"rounds": rounds, "local_epochs": 1, "batch_size": BATCH, "optimizer": "adam", "lr": LR}
        | {"device": device},
        "simulation": {"gpus_per_site": round(1.0 / sites, 4)} if device == "cuda" else {},
    }


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    return time.perf_counter() - t0, proc


def engine_ratio(data: Path, *, sites: int, rounds: int, device: str) -> dict[str, Any]:
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        exp = Path(tmp) / "exp.yaml"
        exp.write_text(yaml.safe_dump(experiment_yaml(data, sites=sites, rounds=rounds, device=device)))
        med_s, med = timed([sys.executable, "-m", "medflower.cli", "simulate", str(exp), "-o", f"{tmp}/out"])
        if med.returncode != 0:
            sys.exit(f"medflower simulate failed:\n{med.stderr[-3000:]}")
        summary = json.loads((Path(tmp) / "out" / "summary.json").read_text())
    plain_cmd = [sys.executable, __file__, "--plain", "--data", str(data), "--sites", str(sites)]
    plain_s, plain = timed([*plain_cmd, "--rounds", str(rounds), "--device", device])
    if plain.returncode != 0:
        sys.exit(f"plain loop failed:\n{plain.stderr[-3000:]}")
    return {
        "medflower_s": med_s,
        "plain_s": plain_s,
        "ratio": med_s / plain_s,
        "medflower_test_accuracy": summary["final_global_test"]["accuracy"],
        "plain_test_accuracy": json.loads(plain.stdout.strip().splitlines()[-1])["test_accuracy"],
    }


# ---- one epoch of a 3D U-Net site --------------------------------------------------------------------------


def synthetic_volumes(n: int, side: int, seed: int = SEED) -> Any:
    """SYNTHETIC 3D images: noise with a bright ellipsoid, whose voxels are the mask (class 1)."""
    import numpy as np

    from medflower.data import ArraySplit

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij")).astype(np.float32)
    images, masks = [], []
    for _ in range(n):
        centre = rng.uniform(side * 0.3, side * 0.7, 3)[:, None, None, None]
        radii = rng.uniform(side * 0.1, side * 0.25, 3)[:, None, None, None]
        mask = (((grid - centre) / radii) ** 2).sum(0) <= 1
        images.append((rng.normal(0, 0.3, (side,) * 3) + mask).astype(np.float32)[None])
        masks.append(mask.astype(np.int64)[None])
    return ArraySplit(np.stack(images), np.stack(masks))


def unet_epoch(device: str, precision: str, *, volumes: int = 32, side: int = 64, batch: int = 4) -> dict[str, float]:
    """Seconds and peak GPU memory of one local epoch of medflower's 3D ``unet`` site in ``precision``."""
    import numpy as np
    import torch

    from medflower.client.train import make_loader, make_optimizer, train_epochs
    from medflower.config import ExperimentConfig
    from medflower.config.model import ModelConfig
    from medflower.device import pin_memory, resolve_amp
    from medflower.models import build_model

    amp = resolve_amp(device, precision)
    split = synthetic_volumes(volumes, side)
    torch.manual_seed(SEED)
    cfg = ModelConfig(name="unet", spatial_dims=3)
    model = build_model(cfg, in_channels=1, out_channels=2, img_size=(side,) * 3, task="segmentation").to(amp.device)
    train = ExperimentConfig().train
    loader = make_loader(split, batch, SEED, pin_memory=pin_memory(amp.device))
    opt = make_optimizer(model, train)
    cuda = amp.device.type == "cuda"
    warm = make_loader(split.subset(np.arange(batch)), batch, SEED)
    train_epochs(model, warm, opt, epochs=1, task="segmentation", amp=amp)  # cuDNN autotuning, CUDA context
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    stats = train_epochs(model, loader, opt, epochs=1, task="segmentation", amp=amp)
    if cuda:
        torch.cuda.synchronize()
    return {
        "seconds": time.perf_counter() - t0,
        "loss": stats.loss,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--unet-volumes", type=int, default=32)
    ap.add_argument("--unet-side", type=int, default=64)
    ap.add_argument("--plain", action="store_true", help="internal: run only the plain loop, print its JSON")
    args = ap.parse_args(argv)
    if args.plain:
        print(json.dumps(plain_fedavg(args.data, sites=args.sites, rounds=args.rounds, device=args.device)))
        return 0
    if args.device == "cuda" and (reason := no_cuda_message()) is not None:
        print(reason, file=sys.stderr)
        return 2
    if not args.data.is_file():
        print(f"gpu_check: {args.data} not found (the shared MedMNIST files: ../shared/data/medmnist)", file=sys.stderr)
        return 2
    import torch

    from medflower.device import describe, resolve_device

    print(f"device: {describe(resolve_device(args.device))}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    r = engine_ratio(args.data, sites=args.sites, rounds=args.rounds, device=args.device)
    print("\n| workload | medflower simulate (s) | plain loop (s) | ratio | test acc medflower / plain |")
    print("|---|---|---|---|---|")
    print(
        f"| {args.data.stem}, {args.sites} sites, {args.rounds} rounds, {args.device} | {r['medflower_s']:.1f} | "
        f"{r['plain_s']:.1f} | **{r['ratio']:.2f}x** | "
        f"{r['medflower_test_accuracy']:.3f} / {r['plain_test_accuracy']:.3f} |"
    )
    rows = {p: unet_epoch(args.device, p, volumes=args.unet_volumes, side=args.unet_side) for p in ("fp32", "bf16")}
    print(
        f"\n3D U-Net site, one epoch of {args.unet_volumes} SYNTHETIC {args.unet_side}^3 volumes, batch 4:\n\n"
        "| precision | seconds | peak GPU memory (GiB) | loss |\n|---|---|---|---|"
    )
    for p, u in rows.items():
        print(f"| {p} | {u['seconds']:.2f} | {u['peak_gib']:.2f} | {u['loss']:.3f} |")
    print(f"\nbf16 speed-up: {rows['fp32']['seconds'] / rows['bf16']['seconds']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
