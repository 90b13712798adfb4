"""The model zoo (MONAI networks) in 2D and 3D, its argument checks, and the segmentation metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from medflower.config import ConfigError, ExperimentConfig, ModelConfig
from medflower.data.base import ArraySplit
from medflower.metrics import dice_score, hd95_score
from medflower.models import build_model, count_parameters
from medflower.tasks import evaluate, inference_roi, logits_of, predict

# (name, task, 2D size, 3D size, params): the smallest inputs each network takes, so the test is fast
ZOO = [
    ("cnn", "classification", (28, 28), (16, 16, 16), {}),
    ("resnet18", "classification", (28, 28), (16, 16, 8), {}),
    ("resnet34", "classification", (28, 28), (16, 16, 8), {}),
    ("densenet121", "classification", (32, 32), (32, 32, 32), {}),
    ("efficientnet-b0", "classification", (32, 32), (32, 32, 32), {}),
    ("vit", "classification", (28, 28), (16, 16, 16), {"num_layers": 1}),
    ("unet", "segmentation", (32, 32), (32, 32, 8), {}),
    ("basicunet", "segmentation", (32, 32), (16, 16, 16), {}),
    ("swinunetr", "segmentation", (32, 32), (32, 32, 32), {"depths": [1, 1, 1, 1]}),
]


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name, task, size2, size3, params", ZOO, ids=[z[0] for z in ZOO])
def test_every_network_builds_and_runs_forward(name, task, size2, size3, params, spatial_dims) -> None:
    size = size2 if spatial_dims == 2 else size3
    model = build_model(
        ModelConfig(name=name, spatial_dims=spatial_dims, params=params),
        in_channels=3,
        out_channels=2,
        img_size=size,
        task=task,
    )
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())  # GroupNorm default
    assert any(isinstance(m, (nn.GroupNorm, nn.LayerNorm)) for m in model.modules())
    model.eval()
    with torch.no_grad():
        out = logits_of(model(torch.randn(1, 3, *size)))
    expected = (1, 2) if task == "classification" else (1, 2, *size)
    assert tuple(out.shape) == expected and torch.isfinite(out).all()


def test_unet_with_groupnorm_trains_on_two_classes() -> None:
    """MONAI's U-Net cannot GroupNorm(8) its 2-class output; the zoo adds a 1x1 head instead."""
    model = build_model(ModelConfig(name="unet"), in_channels=1, out_channels=2, img_size=(32, 32), task="segmentation")
    x, y = torch.randn(2, 1, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).long()
    from medflower.tasks import make_loss

    loss = make_loss("segmentation")(model(x), y)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_norm_is_configurable() -> None:
    bn = build_model(ModelConfig(name="densenet121", norm="batch"), in_channels=1, out_channels=3, img_size=(32, 32))
    assert any(isinstance(m, nn.BatchNorm2d) for m in bn.modules())
    inst = build_model(
        ModelConfig(name="unet", norm="instance"), in_channels=1, out_channels=2, img_size=(32, 32), task="segmentation"
    )
    assert any(isinstance(m, nn.InstanceNorm2d) for m in inst.modules())


def test_params_are_validated_against_the_monai_signature() -> None:
    with pytest.raises(ConfigError, match=r"model.params.hiden_size: not an argument of 'vit'; valid: .*hidden_size"):
        build_model(
            ModelConfig(name="vit", params={"hiden_size": 64}), in_channels=1, out_channels=2, img_size=(28, 28)
        )
    with pytest.raises(ConfigError, match="multiples of 8"):
        build_model(
            ModelConfig(name="swinunetr", params={"feature_size": 12}),
            in_channels=1,
            out_channels=2,
            img_size=(32, 32),
            task="segmentation",
        )
    with pytest.raises(ConfigError, match="model.params.in_channels: set by medflower"):
        build_model(
            ModelConfig(name="unet", params={"in_channels": 3}),
            in_channels=1,
            out_channels=2,
            img_size=(32, 32),
            task="segmentation",
        )
    small = build_model(
        ModelConfig(name="unet", params={"channels": [8, 16, 32], "strides": [2, 2]}),
        in_channels=1,
        out_channels=2,
        img_size=(32, 32),
        task="segmentation",
    )
    default = build_model(
        ModelConfig(name="unet"), in_channels=1, out_channels=2, img_size=(32, 32), task="segmentation"
    )
    assert count_parameters(small) < count_parameters(default)


@pytest.mark.parametrize(
    "name, size, norm, match",
    [
        ("swinunetr", (48, 48), "group", "multiple of 32"),
        ("densenet121", (28, 28), "group", "every axis must be >= 32"),
        ("efficientnet-b0", (32, 32), "instance", "model.norm: 'instance'"),
        ("unet", (36, 36), "group", "multiple of 8"),
        ("basicunet", (64, 64, 8), "group", ">= 16"),
    ],
)
def test_input_size_limits_are_named_before_building(name, size, norm, match) -> None:
    task = "classification" if name in ("densenet121", "efficientnet-b0") else "segmentation"
    with pytest.raises(ConfigError, match=f"{match}.*data.size"):
        build_model(
            ModelConfig(name=name, spatial_dims=len(size), norm=norm),
            in_channels=1,
            out_channels=2,
            img_size=size,
            task=task,
        )


def test_task_and_model_must_match() -> None:
    with pytest.raises(ConfigError, match="not a segmenter; valid for segmentation: unet, basicunet, swinunetr"):
        build_model(ModelConfig(name="resnet18"), in_channels=1, out_channels=2, img_size=(32, 32), task="segmentation")


def test_vit_returns_logits_through_logits_of() -> None:
    vit = build_model(
        ModelConfig(name="vit", params={"num_layers": 1}), in_channels=3, out_channels=5, img_size=(28, 28)
    )
    raw = vit(torch.randn(2, 3, 28, 28))
    assert isinstance(raw, tuple) and logits_of(raw).shape == (2, 5)


# ------------------------------------------------------------------------------------------- metrics
def _logits(pred: np.ndarray) -> torch.Tensor:
    """Two-class logits whose argmax is ``pred`` (N, *spatial)."""
    p = torch.from_numpy(pred).long()
    return torch.nn.functional.one_hot(p, 2).movedim(-1, 1).float() * 10


def test_dice_and_hd95_on_known_masks() -> None:
    gt = np.zeros((4, 1, 20, 20), np.int64)
    gt[0, 0, 5:10, 5:10] = 1  # perfect prediction
    gt[1, 0, 5:10, 5:10] = 1  # prediction shifted by 2 pixels
    gt[2, 0, 5:10, 5:10] = 1  # nothing predicted
    pred = np.zeros((4, 20, 20), np.int64)  # image 3: empty truth, empty prediction
    pred[0, 5:10, 5:10] = 1
    pred[1, 7:12, 5:10] = 1
    d = dice_score(_logits(pred), torch.from_numpy(gt))
    h = hd95_score(_logits(pred), torch.from_numpy(gt))
    assert d[0] == pytest.approx(1.0) and d[1] == pytest.approx(15 / 25) and d[2] == pytest.approx(0.0)
    assert d[3] == pytest.approx(1.0)
    assert h[0] == pytest.approx(0.0) and h[1] == pytest.approx(2.0) and h[3] == pytest.approx(0.0)
    assert h[2] == pytest.approx(math.sqrt(20**2 + 20**2))  # missed lesion: the worst distance


class OnlyROI(nn.Module):
    """A segmenter that refuses any input but its training patch size (like a ViT-based one)."""

    def __init__(self, roi: tuple[int, ...]) -> None:
        super().__init__()
        self.roi = roi
        self.conv = nn.Conv3d(1, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.roi:
            raise RuntimeError(f"input {tuple(x.shape[2:])} is not the patch size {self.roi}")
        return self.conv(x)


def test_sliding_window_covers_whole_volumes_with_patch_sized_windows() -> None:
    exp = ExperimentConfig.from_dict(
        {"task": "segmentation", "data": {"kind": "synthetic", "size": [32, 32, 16], "patch_size": [16, 16, 8]}}
    )
    roi = inference_roi(exp)
    assert roi == (16, 16, 8)
    assert inference_roi(ExperimentConfig.from_dict({"task": "classification"})) is None
    model = OnlyROI(roi)
    split = ArraySplit(
        np.random.default_rng(0).normal(size=(2, 1, 32, 32, 16)).astype(np.float32),
        np.zeros((2, 1, 32, 32, 16), np.int64),
    )
    with pytest.raises(RuntimeError, match="not the patch size"):
        predict(model, split, task="segmentation")
    out = predict(model, split, task="segmentation", roi_size=roi)
    assert out.shape == (2, 2, 32, 32, 16)
    res = evaluate(model, split, task="segmentation", roi_size=roi)
    assert set(res) == {"loss", "dice", "hd95"} and 0.0 <= res["dice"] <= 1.0
