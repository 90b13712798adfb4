"""Saliency of a global model on test images (``medflower explain``): why it decides as it does.

* CNNs: Grad-CAM (``monai.visualize.GradCAM``) on the last convolutional stage's output (the last
  spatial feature map, activated), where the class evidence is still spatial;
* the ViT: occlusion sensitivity (``monai.visualize.OcclusionSensitivity``): Grad-CAM needs a
  convolutional feature map, which a ViT lacks; the map is the drop of the predicted class's
  probability when a patch is masked;
* segmentation models: their prediction is already a map, so the grid shows prediction overlays
  instead (and says so).

3D images are shown as the middle slice of each axis. The output is one PNG grid: image, saliency
overlay, label, prediction with its probability, and the method's name in the title. Shared by the
researcher's command (a run folder) and a hospital's (its own data, :mod:`medflower.client.explain`):
nothing here sends anything anywhere.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from medflower._preload import require_monai
from medflower.config import ExperimentConfig
from medflower.data import load_dataset
from medflower.data.base import ArraySplit
from medflower.fileio import atomic_write_text
from medflower.report.plots import png
from medflower.report.predictions import display_planes, load_run, read_summary, segmentation_overlays
from medflower.strategies.registry import model_device
from medflower.tasks import logits_of

GRADCAM = "Grad-CAM (monai.visualize.GradCAM)"
OCCLUSION = "occlusion sensitivity (monai.visualize.OcclusionSensitivity)"


class Logits(nn.Module):
    """The model with its logits as the only output (MONAI's ViT also returns hidden states)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_of(self.net(x))


def last_conv(model: nn.Module) -> str | None:
    """The name of the last convolution module (the last convolutional stage's output), or None."""
    name = None
    for n, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            name = n
    return name


def last_stage(model: nn.Module, x: torch.Tensor) -> str:
    """The last layer whose output is still a spatial feature map: the last convolutional stage's output.

    Found by running ``x`` once and watching the leaf modules in execution order, because that
    layer's name differs across the zoo (SmallCNN's last ReLU, ResNet's ``layer4`` block output,
    DenseNet's ``class_layers.relu``). Grad-CAM needs the activated maps there, not the last
    convolution's raw output: a norm and an activation follow that convolution.
    """
    seen: list[tuple[str, object]] = []  # a module may return a tuple
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, n=n: seen.append((n, out)))
        for n, m in model.named_modules()
        if not list(m.children())
    ]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in hooks:
            h.remove()
    for name, out in reversed(seen):
        if isinstance(out, torch.Tensor) and out.ndim == x.ndim and min(out.shape[2:]) > 1:
            return name
    raise ValueError("Grad-CAM: the model has no spatial feature map to explain; use occlusion sensitivity")


def method_for(model_name: str, model: nn.Module) -> str:
    return OCCLUSION if model_name == "vit" or last_conv(model) is None else GRADCAM


@dataclass
class Saliency:
    maps: np.ndarray  # (N, *spatial), each in [0, 1]
    predicted: np.ndarray  # (N,) class index
    probability: np.ndarray  # (N,) softmax probability of the predicted class
    method: str


def saliency(model: nn.Module, images: np.ndarray, *, method: str) -> Saliency:
    """Saliency maps of ``model``'s predicted class for ``images`` (N, C, *spatial)."""
    net = Logits(model).eval()
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(model_device(model))
    with torch.no_grad():
        probs = torch.softmax(net(x), dim=1)
    predicted = probs.argmax(dim=1)
    maps = []
    if method == GRADCAM:
        require_monai()
        from monai.visualize import GradCAM

        # MONAI's default postprocessing maps (min, max) to (1, 0), an inverted map; ours scales below
        cam = GradCAM(nn_module=net, target_layers=last_stage(net, x), postprocessing=lambda t: t)
        for i in range(len(x)):
            maps.append(cam(x[i : i + 1], class_idx=int(predicted[i]))[0, 0].detach().cpu().numpy())
    else:
        require_monai()
        from monai.visualize import OcclusionSensitivity

        spatial = x.shape[2:]
        mask = tuple(max(1, s // 4) | 1 for s in spatial)  # odd, a quarter of each axis
        occ = OcclusionSensitivity(nn_module=net, mask_size=mask, n_batch=16, verbose=False, overlap=0.5)
        for i in range(len(x)):
            with warnings.catch_warnings():  # MONAI 1.6.1 indexes with lists, which torch 2.13 warns about
                warnings.simplefilter("ignore", UserWarning)
                occ_map, _ = occ(x[i : i + 1])
            k = int(predicted[i])
            # (1, classes, *spatial); MONAI's docstring also allows (1, C, *spatial, classes)
            p_k = occ_map[0, k] if occ_map.ndim == x.ndim else occ_map[0, 0, ..., k]
            maps.append(float(probs[i, k]) - p_k.detach().cpu().numpy())  # importance: the probability lost
    out = []
    for m in maps:
        m = np.nan_to_num(np.asarray(m, dtype=np.float32))
        lo, hi = float(m.min()), float(m.max())
        out.append((m - lo) / (hi - lo) if hi > lo else np.zeros_like(m))
    return Saliency(np.stack(out), predicted.cpu().numpy(), probs.max(dim=1).values.cpu().numpy(), method)


def saliency_grid(images: np.ndarray, labels: np.ndarray, sal: Saliency, *, title: str) -> bytes:
    """A PNG: one row per image (per axis in 3D): image, overlay, label, prediction with its probability."""
    rows = []
    for i in range(len(images)):
        for (plane_title, plane), (_, smap) in zip(
            display_planes(images[i][0]), display_planes(sal.maps[i]), strict=True
        ):
            rows.append((i, plane_title, plane, smap))
    fig = Figure(figsize=(6.0, 2.2 * len(rows) + 0.6), layout="constrained")
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for (i, plane_title, plane, smap), (a_img, a_sal) in zip(rows, axes, strict=True):
        a_img.imshow(plane, cmap="gray")
        a_img.set_title(f"#{i} label {int(labels[i])} {plane_title}".strip(), fontsize=8)
        a_sal.imshow(plane, cmap="gray")
        a_sal.imshow(smap, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        a_sal.set_title(f"predicted {int(sal.predicted[i])} (p={float(sal.probability[i]):.2f})", fontsize=8)
        for ax in (a_img, a_sal):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{title}\n{sal.method}", fontsize=9)
    return png(fig)


@dataclass
class ExplainResult:
    paths: list[Path] = field(default_factory=list)
    note: str = ""


def explain_split(
    model: nn.Module, exp: ExperimentConfig, split: ArraySplit, *, n: int, out_dir: Path, title: str
) -> ExplainResult:
    """Explain the first ``n`` images of ``split``: ``saliency.png`` (or ``predictions.png``), ``explain.json``."""
    if n < 1:
        raise ValueError(f"-n: must be >= 1, got {n}")
    if len(split) == 0:
        raise ValueError(f"{title}: the test split is empty; nothing to explain")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sub = split.subset(np.arange(min(n, len(split))))
    if exp.task == "segmentation":
        from medflower.report.predictions import LoadedRun

        path = out_dir / "predictions.png"
        path.write_bytes(segmentation_overlays(LoadedRun(exp, model), sub, n=len(sub)))
        note = (
            f"{title}: a segmentation model's output is already a map: prediction overlays are shown instead "
            "of saliency (green: truth, red: prediction)"
        )
        method = "prediction overlays"
    else:
        method = method_for(exp.model.name, model)
        sal = saliency(model, sub.images, method=method)
        path = out_dir / "saliency.png"
        path.write_bytes(saliency_grid(sub.images, sub.targets, sal, title=title))
        note = f"{title}: {method} of the predicted class, on {len(sub)} test images"
    meta = out_dir / "explain.json"
    atomic_write_text(meta, json.dumps({"method": method, "note": note, "images": len(sub)}, indent=2))
    return ExplainResult([path, meta], note)


def explain_run(
    run_dir: str | Path,
    *,
    split: ArraySplit | None = None,
    n: int = 16,
    out_dir: str | Path | None = None,
    what: str = "test split",
) -> ExplainResult:
    """Explain a run folder's final global model (``model.pt``) on ``split`` (default: the data set's test split)."""
    run_dir = Path(run_dir)
    read_summary(run_dir)  # a folder without summary.json is an error naming it
    run = load_run(run_dir)
    test = split if split is not None else load_dataset(run.exp).test
    name = run.exp.name
    return explain_split(
        run.model,
        run.exp,
        test,
        n=n,
        out_dir=Path(out_dir) if out_dir else run_dir / "explain",
        title=f"{name}, {what}",
    )
