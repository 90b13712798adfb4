"""Task metrics shared by the server's global evaluation and the sites' local evaluation.

AUC comes from MONAI (``compute_roc_auc``, one-vs-rest macro average for more than two classes);
Dice from MONAI's ``DiceMetric``, HD95 from its ``HausdorffDistanceMetric``. Accuracy and balanced
accuracy are one line each, so they are written here rather than pulling in scikit-learn.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, compute_roc_auc


def _auc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """MONAI's ROC AUC of one score column as a float (MONAI types its result as any array-like)."""
    return float(np.asarray(compute_roc_auc(probs, labels), dtype=np.float64))


def _tensor(value: object, what: str) -> torch.Tensor:
    """``value`` if it is a tensor: MONAI's metrics type their result as a tensor or nested sequences."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} returned {type(value).__name__}, expected a tensor")
    return value


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, balanced accuracy and AUC from raw logits ``(N, C)`` and integer labels ``(N,)``.

    AUC is NaN when the evaluated split holds a single class (it is undefined there); callers
    aggregate with NaN-aware means.
    """
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits must be (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    n, c = logits.shape
    if n == 0:
        return {"accuracy": math.nan, "balanced-accuracy": math.nan, "auc": math.nan}
    labels = labels.long()
    pred = logits.argmax(dim=1)
    acc = (pred == labels).float().mean().item()
    recalls = [(pred[labels == k] == k).float().mean().item() for k in range(c) if (labels == k).any()]
    bacc = float(np.mean(recalls))
    probs = torch.softmax(logits.float(), dim=1)
    present = torch.unique(labels)
    if len(present) < 2:
        auc = math.nan
    elif c == 2:
        auc = _auc(probs[:, 1], labels)
    else:
        # one-vs-rest macro over classes present in this split (absent classes have no ROC)
        onehot = torch.nn.functional.one_hot(labels, c)
        aucs = [_auc(probs[:, k], onehot[:, k]) for k in present.tolist()]
        auc = float(np.mean(aucs))
    return {"accuracy": acc, "balanced-accuracy": bacc, "auc": auc}


def dice_score(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-image mean foreground Dice from logits ``(N, C, *spatial)`` and label maps ``(N, 1, *spatial)``.

    An image with an empty ground truth and an empty prediction scores 1 (MONAI's
    ``ignore_empty=False``), so that negative slices are rewarded for predicting nothing.
    """
    c = logits.shape[1]
    pred = logits.argmax(dim=1, keepdim=True)
    pred_oh = torch.nn.functional.one_hot(pred.squeeze(1).long(), c).movedim(-1, 1)
    gt_oh = torch.nn.functional.one_hot(masks.squeeze(1).long(), c).movedim(-1, 1)
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    per_class = _tensor(metric(pred_oh, gt_oh), "DiceMetric")  # (N, C-1)
    return per_class.nanmean(dim=1)


def hd95_score(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-image mean foreground 95th-percentile Hausdorff distance (in voxels of the prepared grid).

    MONAI's ``HausdorffDistanceMetric(percentile=95)`` on the argmax prediction. MONAI returns NaN when
    the prediction or the ground truth of a class is empty; here both empty scores 0 (the same case
    Dice scores 1) and exactly one empty scores the grid's diagonal, the largest distance possible, so
    a model that predicts nothing is penalised instead of silently left out of the mean.
    """
    c = logits.shape[1]
    pred = logits.argmax(dim=1)
    gt = masks.squeeze(1).long()
    pred_oh = torch.nn.functional.one_hot(pred.long(), c).movedim(-1, 1)
    gt_oh = torch.nn.functional.one_hot(gt, c).movedim(-1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on every empty class; handled below
        metric = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
        hd = _tensor(metric(pred_oh, gt_oh), "HausdorffDistanceMetric")
    spatial = pred_oh.shape[2:]
    diagonal = float(math.sqrt(sum(s * s for s in spatial)))
    pred_any = pred_oh[:, 1:].flatten(2).any(-1)
    gt_any = gt_oh[:, 1:].flatten(2).any(-1)
    hd = torch.where(~pred_any & ~gt_any, torch.zeros_like(hd), hd)
    hd = torch.where(pred_any ^ gt_any, torch.full_like(hd, diagonal), hd)
    return hd.float().nanmean(dim=1)
