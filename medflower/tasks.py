"""Per-task loss and evaluation, shared by the server (global test) and the sites (local val/test).

Keeping one evaluation routine guarantees that "global test AUC" and a site's "local AUC" are the
same computation on different data.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from medflower._preload import require_monai
from medflower.config import ExperimentConfig
from medflower.data.base import ArraySplit
from medflower.device import Amp, pin_memory, to_device
from medflower.metrics import classification_metrics, dice_score, hd95_score
from medflower.strategies.registry import model_device
from medflower.threshold import confusion_matrix, score_histograms


def logits_of(output: Any) -> torch.Tensor:
    """MONAI's ViT returns ``(logits, hidden_states)``; everything else returns logits."""
    logits = output[0] if isinstance(output, (tuple, list)) else output
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"model output must be a tensor or (logits, ...), got {type(logits).__name__}")
    return logits


def inference_roi(exp: ExperimentConfig) -> tuple[int, ...] | None:
    """The sliding-window size for a segmentation experiment: ``data.patch_size`` (what the model was
    trained on), else None (the model sees whole images). Both the server's and the sites'
    evaluation call this, so they infer identically."""
    if exp.task != "segmentation" or exp.data.patch_size is None:
        return None
    return tuple(int(v) for v in exp.data.patch_size)


def make_loss(task: str) -> nn.Module:
    if task == "classification":
        return nn.CrossEntropyLoss()
    if task == "segmentation":
        require_monai()
        from monai.losses import DiceCELoss

        return DiceCELoss(to_onehot_y=True, softmax=True)
    raise ValueError(f"task must be 'classification' or 'segmentation', got {task!r}")


def _batches(split: ArraySplit, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """The split's images in batches, on ``device`` (through pinned memory to a GPU)."""
    for i in range(0, len(split), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(split.images[i : i + batch_size]))
        yield to_device(x.pin_memory() if pin_memory(device) else x, device)


def _autocast_logits(model: nn.Module, x: torch.Tensor, amp: Amp) -> torch.Tensor:
    with amp.autocast():
        return logits_of(model(x)).float()


@torch.no_grad()
def predict(
    model: nn.Module,
    split: ArraySplit,
    *,
    batch_size: int = 256,
    task: str = "classification",
    roi_size: tuple[int, ...] | None = None,
    amp: Amp | None = None,
) -> torch.Tensor:
    """Float32 CPU logits for a whole split, computed where ``model`` is, in ``amp``'s precision.

    With ``roi_size`` (segmentation trained on patches), MONAI's ``sliding_window_inference``
    covers each whole image with overlapping windows of that size."""
    model.eval()
    amp = amp or Amp(model_device(model))
    outs = []
    for x in _batches(split, batch_size, amp.device):
        if roi_size is not None and task == "segmentation":
            require_monai()
            from monai.inferers import sliding_window_inference

            out = logits_of(  # a tensor predictor gives a tensor; logits_of checks it for the type checker too
                sliding_window_inference(
                    x, roi_size, sw_batch_size=4, overlap=0.25, predictor=lambda t: _autocast_logits(model, t, amp)
                )
            )
        else:
            with amp.autocast():
                out = logits_of(model(x))
        outs.append(out.float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


def evaluate(
    model: nn.Module,
    split: ArraySplit,
    *,
    task: str,
    batch_size: int = 256,
    roi_size: tuple[int, ...] | None = None,
    hd95: bool = True,
    amp: Amp | None = None,
    histograms: bool = False,
    confusion: bool = False,
) -> dict[str, Any]:
    """Loss and task metrics of ``model`` on ``split`` (NaN metrics for an empty split).

    The model runs where it is, in ``amp``'s precision (default float32); the metrics are computed
    on the CPU from float32 logits.

    Segmentation reports ``dice`` and, with ``hd95``, ``hd95`` (voxels; see :func:`hd95_score`):
    means over the split's images. Classification adds, with ``histograms`` and two classes, the
    per-class score histograms ``score-hist-0``/``score-hist-1`` (lists of counts) a federated
    threshold is chosen from, and with ``confusion`` the ``confusion-matrix`` (rows: true class,
    columns: predicted); see :mod:`medflower.threshold`.
    """
    if len(split) == 0:  # no histograms or confusion matrix: nothing was scored
        seg = {"dice": math.nan} | ({"hd95": math.nan} if hd95 else {})
        return {"loss": math.nan} | (
            seg if task == "segmentation" else {"accuracy": math.nan, "balanced-accuracy": math.nan, "auc": math.nan}
        )
    logits = predict(model, split, batch_size=batch_size, task=task, roi_size=roi_size, amp=amp)
    targets = torch.from_numpy(np.ascontiguousarray(split.targets))
    loss = float(make_loss(task)(logits, targets).item())
    if task == "classification":
        out_c: dict[str, Any] = {"loss": loss, **classification_metrics(logits, targets)}
        if histograms and logits.shape[1] == 2:
            out_c |= score_histograms(logits, targets)
        if confusion:
            out_c["confusion-matrix"] = confusion_matrix(logits, targets)
        return out_c
    out = {"loss": loss, "dice": float(dice_score(logits, targets).nanmean().item())}
    if hd95:
        out["hd95"] = float(hd95_score(logits, targets).nanmean().item())
    return out
