"""Per-task loss and evaluation, shared by the server (global test) and the sites (local val/test).

Keeping one evaluation routine guarantees that "global test AUC" and a site's "local AUC" are the
same computation on different data.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import nn

from medflower.data.base import ArraySplit
from medflower.metrics import classification_metrics, dice_score


def logits_of(output: Any) -> torch.Tensor:
    """MONAI's ViT returns ``(logits, hidden_states)``; everything else returns logits."""
    return output[0] if isinstance(output, (tuple, list)) else output


def make_loss(task: str) -> nn.Module:
    if task == "classification":
        return nn.CrossEntropyLoss()
    if task == "segmentation":
        return DiceCELoss(to_onehot_y=True, softmax=True)
    raise ValueError(f"task must be 'classification' or 'segmentation', got {task!r}")


def _batches(split: ArraySplit, batch_size: int):
    for i in range(0, len(split), batch_size):
        yield (torch.from_numpy(np.ascontiguousarray(split.images[i:i + batch_size])),
               torch.from_numpy(np.ascontiguousarray(split.targets[i:i + batch_size])))


@torch.no_grad()
def predict(model: nn.Module, split: ArraySplit, *, batch_size: int = 256, task: str = "classification",
            roi_size: tuple[int, ...] | None = None) -> torch.Tensor:
    """Logits for a whole split. With ``roi_size`` (3D segmentation), MONAI sliding-window inference."""
    model.eval()
    outs = []
    for x, _ in _batches(split, batch_size):
        if roi_size is not None and task == "segmentation":
            from monai.inferers import sliding_window_inference

            out = sliding_window_inference(x, roi_size, sw_batch_size=4, predictor=lambda t: logits_of(model(t)))
        else:
            out = logits_of(model(x))
        outs.append(out.float())
    return torch.cat(outs) if outs else torch.empty(0)


def evaluate(model: nn.Module, split: ArraySplit, *, task: str, batch_size: int = 256,
             roi_size: tuple[int, ...] | None = None) -> dict[str, float]:
    """Loss and task metrics of ``model`` on ``split`` (NaN metrics for an empty split)."""
    if len(split) == 0:
        return {"loss": math.nan} | ({"dice": math.nan} if task == "segmentation"
                                     else {"accuracy": math.nan, "balanced-accuracy": math.nan, "auc": math.nan})
    logits = predict(model, split, batch_size=batch_size, task=task, roi_size=roi_size)
    targets = torch.from_numpy(np.ascontiguousarray(split.targets))
    loss = float(make_loss(task)(logits, targets).item())
    if task == "classification":
        return {"loss": loss, **classification_metrics(logits, targets)}
    return {"loss": loss, "dice": float(dice_score(logits, targets).nanmean().item())}
