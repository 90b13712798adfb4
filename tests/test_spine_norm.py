"""`model.norm: group` really means no BatchNorm anywhere (DP and FedBN depend on it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medflower.config import ModelConfig
from medflower.models import build_model


@pytest.mark.parametrize("name", ["cnn", "resnet18", "resnet34", "densenet121", "efficientnet-b0"])
def test_group_norm_leaves_no_batchnorm(name: str) -> None:
    model = build_model(ModelConfig(name=name, norm="group"), in_channels=3, out_channels=4, img_size=(32, 32))
    bn = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bn == [], f"{name} still has BatchNorm at {bn[:3]}"
    assert not any("running_mean" in k or "num_batches_tracked" in k for k in model.state_dict())
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 4)


def test_batch_norm_when_asked() -> None:
    model = build_model(ModelConfig(name="resnet18", norm="batch"), in_channels=1, out_channels=2, img_size=(28, 28))
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
