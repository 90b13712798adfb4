"""The yardstick of ``bench/engine.py``: a plain single-process PyTorch FedAvg loop, no framework.

``python bench/plain_fedavg.py SITES.npz SPEC.json`` does the work ``medflower simulate`` does for the
same experiment, written the way a researcher would write it by hand: the same sites (the arrays
``bench/engine.py`` took from :func:`medflower.simulation.sites.build_sites`), the same network built
after ``torch.manual_seed(seed)`` (:class:`medflower.smallcnn.SmallCNN`, imported from a module that
loads torch only), the same rounds, local epochs, optimizer, learning rate, batch size and thread
count; every round each site trains from the global model, the updates are averaged weighted by
sample count, the global model is evaluated on every site's validation split and on the held-out
test split (as medflower's sites and server do), and at the end on every site's test split.
It prints one JSON line: final test accuracy and balanced accuracy.
"""

from __future__ import annotations

import json
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medflower.smallcnn import SmallCNN


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)]) if len(x) else torch.zeros(0)
    if len(x) == 0:
        return {"accuracy": float("nan"), "balanced-accuracy": float("nan")}
    pred = logits.argmax(1)
    recalls = [float((pred[y == c] == c).float().mean()) for c in torch.unique(y)]
    return {"accuracy": float((pred == y).float().mean()), "balanced-accuracy": float(np.mean(recalls))}


Split = tuple[torch.Tensor, torch.Tensor]


def load_work(npz_path: str, spec_path: str) -> tuple[dict[str, Any], list[dict[str, Split]], Split]:
    """The recipe, every site's train/val/test split and the held-out test split; sets the thread count.

    Shared with ``bench/pfl_fedavg.py`` so that both loops start from the very same tensors.
    """
    spec = json.loads(Path(spec_path).read_text())
    data = np.load(npz_path)
    torch.set_num_threads(spec["num_threads"])
    sites = [
        {
            s: (torch.from_numpy(data[f"{i}_{s}_x"]), torch.from_numpy(data[f"{i}_{s}_y"]))
            for s in ("train", "val", "test")
        }
        for i in range(spec["num_sites"])
    ]
    return spec, sites, (torch.from_numpy(data["test_x"]), torch.from_numpy(data["test_y"]))


def shuffle_seed(seed: int, rnd: int, site: int) -> int:
    """The seed medflower's site ``site`` shuffles its training split with in round ``rnd`` (1-based)."""
    return seed * 100003 + rnd * 101 + zlib.crc32(f"site-{site}".encode()) % 97


def report(final: dict[str, float], t0: float) -> None:
    """The one JSON line ``bench/engine.py`` reads: final global test metrics and the loop's own seconds."""
    print(json.dumps({"final_global_test": final, "loop_seconds": time.time() - t0}))


def main(npz_path: str, spec_path: str) -> None:
    t0 = time.time()
    spec, sites, test = load_work(npz_path, spec_path)
    torch.manual_seed(spec["seed"])
    model = SmallCNN(**spec["model"])
    loss_fn = nn.CrossEntropyLoss()
    batch, eval_batch = spec["batch_size"], spec["eval_batch_size"]
    _evaluate(model, *test, eval_batch)
    for rnd in range(1, spec["rounds"] + 1):
        global_state = {k: v.clone() for k, v in model.state_dict().items()}
        total: dict[str, torch.Tensor] = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
        n_total = 0
        for i, site in enumerate(sites):
            model.load_state_dict(global_state)
            model.train()
            seed = shuffle_seed(spec["seed"], rnd, i)
            torch.manual_seed(seed)
            loader = DataLoader(
                TensorDataset(*site["train"]),
                batch_size=batch,
                shuffle=True,
                generator=torch.Generator().manual_seed(seed),
            )
            opt = torch.optim.Adam(model.parameters(), lr=spec["lr"])
            for _ in range(spec["local_epochs"]):
                for x, y in loader:
                    opt.zero_grad(set_to_none=True)
                    loss_fn(model(x), y).backward()
                    opt.step()
            n = len(site["train"][0])
            for k, v in model.state_dict().items():
                total[k] += v.double() * n
            n_total += n
        model.load_state_dict({k: (v / n_total).to(global_state[k].dtype) for k, v in total.items()})
        for site in sites:
            _evaluate(model, *site["val"], eval_batch)
        final = _evaluate(model, *test, eval_batch)
    for site in sites:
        _evaluate(model, *site["test"], eval_batch)
    report(final, t0)


if __name__ == "__main__":
    main(*sys.argv[1:3])
