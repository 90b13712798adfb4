"""Task metrics shared by the server's global evaluation and the sites' local evaluation.

Dice comes from MONAI's ``DiceMetric``, HD95 from its ``HausdorffDistanceMetric``. Accuracy and
balanced accuracy are one line each, so they are written here rather than pulling in scikit-learn.

AUC is computed here, in torch (:func:`roc_auc`: the Mann-Whitney statistic, ties counting one half,
one-vs-rest macro average for more than two classes), although MONAI ships ``compute_roc_auc``: a
classification run needs nothing else from MONAI, whose import costs about 4 s of CPU in every
process (medflower._preload), most of the ``local`` engine's overhead against a plain PyTorch loop
on small data sets. It gives MONAI's numbers (tests/test_metrics_auc.py compares them).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from medflower._preload import require_monai


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1 = positive).

    The probability that a random positive scores above a random negative, ties counting one half
    (Mann-Whitney U / (n_pos * n_neg)), from average ranks: the same number as the trapezoidal area
    under the ROC curve, which is what MONAI's ``compute_roc_auc`` returns. NaN with one class only.
    """
    s = scores.detach().flatten().double().cpu()
    y = labels.detach().flatten().cpu() > 0
    n_pos = int(y.sum())
    n_neg = int(y.numel()) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    top = torch.cumsum(counts, 0).double()  # 1-based rank of each distinct value's last copy
    ranks = (top - (counts.double() - 1) / 2)[inverse]  # tied scores share their average rank
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


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
        auc = roc_auc(probs[:, 1], labels)
    else:
        # one-vs-rest macro over classes present in this split (absent classes have no ROC)
        onehot = torch.nn.functional.one_hot(labels, c)
        aucs = [roc_auc(probs[:, k], onehot[:, k]) for k in present.tolist()]
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
    require_monai()
    from monai.metrics import DiceMetric

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
    require_monai()
    from monai.metrics import HausdorffDistanceMetric

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
