"""What the final global model predicts on the test split: a confusion matrix, or segmentation overlays.

``summary.json`` holds metrics, not predictions, so the report reloads the run's ``model.pt`` and
runs it on the experiment's own test split, built by the same loading code as the run
(:func:`medflower.data.load_dataset` with the resolved config from ``summary.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from medflower.config import ExperimentConfig
from medflower.data import load_dataset
from medflower.data.base import ArraySplit
from medflower.device import resolve_device
from medflower.modelspec import build_experiment_model
from medflower.tasks import inference_roi, predict

MODEL_FILE = "model.pt"
SUMMARY_FILE = "summary.json"


class RunFolderError(FileNotFoundError):
    """A folder that is not a run folder (no ``summary.json``)."""


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        raise RunFolderError(f"{run_dir}: no {SUMMARY_FILE} in this folder; is it a medflower run folder?")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise RunFolderError(f"{path}: not a medflower summary (a JSON object is expected)")
    return data


@dataclass
class LoadedRun:
    exp: ExperimentConfig
    model: nn.Module


def load_model(exp: ExperimentConfig, path: Path) -> nn.Module:
    """The experiment's network with the weights in ``path`` (a torch state dict, as runs write it), on
    ``train.device`` where this machine has it, else on the CPU with a warning: a report or a saliency
    map must not fail because it is drawn on a machine without the run's GPU."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    device = resolve_device(exp.train.device, where=f"{path}", fallback=True)
    model = build_experiment_model(exp).to(device)
    model.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    return model.eval()


def load_run(run_dir: Path) -> LoadedRun:
    """The run's resolved experiment and its final global model (``model.pt``)."""
    summary = read_summary(run_dir)
    exp = ExperimentConfig.from_dict(summary["experiment"])
    return LoadedRun(exp, load_model(exp, Path(run_dir) / MODEL_FILE))


def class_names(exp: ExperimentConfig, num_classes: int) -> list[str]:
    names = list(exp.data.classes or [])
    return [str(c) for c in names] if len(names) == num_classes else [str(i) for i in range(num_classes)]


def confusion_matrix(run: LoadedRun) -> tuple[np.ndarray, list[str]]:
    """Counts of (true class, predicted class) on the test split; rows true, columns predicted."""
    ds = load_dataset(run.exp)
    logits = predict(run.model, ds.test, batch_size=run.exp.train.eval_batch_size)
    pred = logits.argmax(dim=1).numpy() if len(logits) else np.zeros(0, dtype=np.int64)
    k = ds.num_classes
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (np.asarray(ds.test.targets, dtype=np.int64), pred), 1)
    return matrix, class_names(run.exp, k)


def middle_slice(volume: np.ndarray, axis: int) -> np.ndarray:
    """The middle 2D slice of a 3D (spatial) array across ``axis``."""
    return np.take(volume, volume.shape[axis] // 2, axis=axis)


def display_planes(image: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(title, rows x cols array) for a spatial image: itself in 2D, the middle slice of each axis in 3D."""
    if image.ndim == 2:
        return [("", image)]
    return [(f"middle slice, axis {a}", middle_slice(image, a)) for a in range(image.ndim)]


def segmentation_overlays(run: LoadedRun, split: ArraySplit, n: int = 4) -> bytes:
    """``n`` test images, each with the true mask's outline (green) and the prediction (red) overlaid.

    Images are ``(C, rows, cols[, slices])``: the first channel is drawn rows x cols, so the picture
    is the right way up (matplotlib's ``imshow`` puts row 0 at the top, as the arrays store it).
    """
    from medflower.report.plots import png

    sub = split.subset(np.arange(min(n, len(split))))
    logits = predict(
        run.model, sub, batch_size=run.exp.train.eval_batch_size, task="segmentation", roi_size=inference_roi(run.exp)
    )
    pred = logits.argmax(dim=1).numpy()
    rows = []
    for i in range(len(sub)):
        img, truth, guess = sub.images[i][0], np.asarray(sub.targets[i]), pred[i]
        truth = truth[0] if truth.ndim == img.ndim + 1 else truth
        for (title, plane), (_, t), (_, p) in zip(
            display_planes(img), display_planes(truth), display_planes(guess), strict=True
        ):
            rows.append((i, title, plane, t, p))
    fig = Figure(figsize=(6.4, 3.0 * max(1, len(rows))), layout="constrained")
    axes = fig.subplots(max(1, len(rows)), 2, squeeze=False)
    for (i, title, plane, t, p), (a_truth, a_pred) in zip(rows, axes, strict=False):
        for ax, mask, what, colour in ((a_truth, t, "truth", "lime"), (a_pred, p, "prediction", "red")):
            ax.imshow(plane, cmap="gray")
            if np.any(mask > 0):
                ax.contour(mask > 0, levels=[0.5], colors=colour, linewidths=1.2)
            ax.set_title(f"test image {i} {title}: {what}".replace("  ", " "), fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    return png(fig)
