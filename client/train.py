"""Local training at a site: the loop every strategy and the DP engine plug into.

Kept small on purpose (fl4health's 1,300-line ``BasicClient`` is what we avoid): strategies add a
loss term or a gradient correction through :class:`LocalHooks`, DP swaps the optimizer/loader.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from medflower.config import TrainConfig
from medflower.data import ArraySplit
from medflower.device import Amp, to_device
from medflower.hooks import LocalHooks, TrainStats
from medflower.tasks import logits_of, make_loss


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_loader(
    split: ArraySplit, batch_size: int, seed: int, *, shuffle: bool = True, pin_memory: bool = False
) -> DataLoader:
    """Batches of ``split``; ``pin_memory`` (a CUDA device) lets them copy to the GPU asynchronously."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        split.to_torch(),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=gen,
        drop_last=False,
        pin_memory=pin_memory,
    )


def average_copies(model: nn.Module, multiplicity: int) -> None:
    """Average Opacus' per-sample gradients over each image's ``multiplicity`` consecutive copies.

    The batch was ``repeat_interleave``-d, so rows ``i*K .. i*K+K-1`` of every ``grad_sample`` belong
    to image ``i``; after this each image has one row, which DP-SGD then clips and noises. A model
    without per-sample gradients (no DP) needs nothing: its ``.grad`` is already the mean over copies.
    """
    for p in model.parameters():
        gs = getattr(p, "grad_sample", None)
        if isinstance(gs, torch.Tensor):
            p.grad_sample = gs.reshape(-1, multiplicity, *gs.shape[1:]).mean(dim=1)  # type: ignore[attr-defined]


def train_epochs(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    task: str,
    hooks: LocalHooks | None = None,
    augment: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    amp: Amp | None = None,
    multiplicity: int = 1,
) -> TrainStats:
    """Run ``epochs`` passes of ``loader``; returns sample counts and the last epoch's mean loss.

    ``augment(x, y) -> (x, y)`` transforms each training batch on the CPU, where its seeded
    generator lives (see :mod:`medflower.client.augment`). ``amp`` says where the model is and in
    what precision it runs (:mod:`medflower.device`; default: float32 on the CPU); the batches
    follow the model. With fp16 the grad scaler unscales the gradients before ``after_backward``,
    so a method's gradient correction (SCAFFOLD) meets true gradients.

    ``multiplicity`` K > 1 (augmentation multiplicity, De et al. 2022, "Unlocking high-accuracy
    differentially private image classification through scale"): each image of a batch is repeated K
    times before ``augment``, and the K copies' gradients are averaged into that image's one gradient;
    under DP-SGD (an Opacus model) the per-sample gradients are averaged *before* clipping, so the
    privacy unit stays the image and the accounting is unchanged, while the clipped gradient carries
    less augmentation noise. Neither Opacus nor MONAI ships it. Without DP it is the mean loss over
    the K copies.
    """
    if multiplicity > 1 and augment is None:
        raise ValueError("multiplicity: copies of an image need an augment to differ")
    hooks = hooks or LocalHooks()
    loss_fn = make_loss(task)
    amp = amp or Amp(torch.device("cpu"))
    scaler = amp.scaler()
    model.train()
    with amp.training(model):  # bf16 on a CPU: see Amp.training
        steps, last_n, last_loss = 0, 0, math.nan
        for _ in range(epochs):
            # summed on the device: float() per step would wait for the GPU at every batch
            total, n = torch.zeros((), dtype=torch.float64, device=amp.device), 0
            for x, y in loader:
                if len(x) == 0:  # Poisson sampling (DP) may draw an empty batch
                    continue
                images = len(x)
                if augment is not None:
                    if multiplicity > 1:
                        x, y = x.repeat_interleave(multiplicity, 0), y.repeat_interleave(multiplicity, 0)
                    x, y = augment(x, y)
                x, y = to_device(x, amp.device), to_device(y, amp.device)
                optimizer.zero_grad(set_to_none=True)
                with amp.autocast():
                    loss = loss_fn(logits_of(model(x)), y)
                    objective = loss + hooks.extra_loss(model) if hooks.extra_loss else loss
                if scaler is None:
                    objective.backward()
                else:
                    scaler.scale(objective).backward()
                    scaler.unscale_(optimizer)
                if multiplicity > 1:
                    average_copies(model, multiplicity)
                if hooks.after_backward:
                    hooks.after_backward(model)
                if scaler is None:
                    optimizer.step()
                else:
                    scaler.step(optimizer)  # skips the step when fp16 overflowed
                    scaler.update()
                steps += 1
                total += loss.detach().double() * images
                n += images
            last_n, last_loss = n, (float(total) / n if n else math.nan)
    if not np.isfinite(last_loss):
        raise FloatingPointError(f"local training diverged (loss={last_loss}); lower train.lr")
    return TrainStats(num_examples=last_n, num_steps=steps, loss=last_loss)
