"""Models under DP-SGD: Opacus' per-sample gradients equal a plain per-sample autograd loop."""

from __future__ import annotations

import warnings

import pytest
import torch
from monai.networks.nets import ViT
from opacus import GradSampleModule

from medflower.config import ExperimentConfig, ModelConfig
from medflower.dpcompat import make_dp_compatible, probe_per_sample_gradients
from medflower.dpvit import DPViT, convert_monai_vit_state_dict
from medflower.models import build_model
from medflower.modelspec import build_experiment_model
from medflower.schema import ConfigError
from medflower.tasks import logits_of, make_loss

VIT = {
    "in_channels": 1,
    "img_size": (16, 16),
    "patch_size": 4,
    "hidden_size": 32,
    "mlp_dim": 64,
    "num_layers": 2,
    "num_heads": 4,
    "classification": True,
    "num_classes": 3,
    "spatial_dims": 2,
    "post_activation": None,
}


def _assert_per_sample_grads_match(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, task: str) -> None:
    """Opacus' grad_sample (batch loss = mean of per-sample losses) vs one backward pass per sample."""
    loss_fn = make_loss(task)
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm = GradSampleModule(model, loss_reduction="mean")
        loss_fn(logits_of(gsm(x)), y).backward()
    got = {n: p.grad_sample.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    gsm.disable_hooks()
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch: full backward hooks (disabled) with input not requiring grad
            loss_fn(logits_of(model(x[i : i + 1])), y[i : i + 1]).backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(got[n][i], p.grad, rtol=1e-4, atol=1e-6, msg=f"{n}, sample {i}")
    gsm._close()


def test_cnn_with_batchnorm_is_fixed_and_per_sample_exact() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(name="cnn", norm="batch")
    model = make_dp_compatible(
        build_model(cfg, in_channels=1, out_channels=2, img_size=(16, 16)), cfg, in_channels=1, img_size=(16, 16)
    )
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    _assert_per_sample_grads_match(model, torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 1, 0]), "classification")


def test_tanh_cnn_is_per_sample_exact_and_bad_activation_names_the_choices() -> None:
    """The DP recipe's tanh ("tempered sigmoid") cnn: Opacus' per-sample gradients stay exact."""
    torch.manual_seed(0)
    cfg = ModelConfig(name="cnn", params={"activation": "tanh"})
    model = build_model(cfg, in_channels=1, out_channels=2, img_size=(16, 16))
    assert any(isinstance(m, torch.nn.Tanh) for m in model.modules())
    assert not any(isinstance(m, torch.nn.ReLU) for m in model.modules())
    _assert_per_sample_grads_match(model, torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 1, 0]), "classification")
    with pytest.raises(ConfigError, match=r"activation must be one of relu, tanh, elu, got 'sigmoid'"):
        build_model(
            ModelConfig(name="cnn", params={"activation": "sigmoid"}), in_channels=1, out_channels=2, img_size=(16, 16)
        )


def test_dpvit_is_monai_vit_and_per_sample_exact() -> None:
    torch.manual_seed(0)
    monai_vit, dp_vit = ViT(**VIT), DPViT(**VIT)
    dp_vit.load_state_dict(convert_monai_vit_state_dict(monai_vit.state_dict()))
    x = torch.randn(4, 1, 16, 16)
    torch.testing.assert_close(dp_vit(x)[0], monai_vit(x)[0])  # the same network
    # MONAI's ViT as shipped breaks Opacus (tuple-returning module owns the class token; unused norms)
    assert probe_per_sample_gradients(monai_vit, in_channels=1, img_size=(16, 16)) is not None
    assert probe_per_sample_gradients(dp_vit, in_channels=1, img_size=(16, 16)) is None
    _assert_per_sample_grads_match(dp_vit, x, torch.tensor([0, 1, 2, 0]), "classification")


def test_unet_segmentation_per_sample_exact() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(name="unet", params={"channels": (8, 16), "strides": (2,), "num_res_units": 1})
    model = make_dp_compatible(
        build_model(cfg, in_channels=1, out_channels=2, img_size=(16, 16), task="segmentation"),
        cfg,
        in_channels=1,
        img_size=(16, 16),
    )
    y = (torch.rand(3, 1, 16, 16) > 0.5).long()
    _assert_per_sample_grads_match(model, torch.randn(3, 1, 16, 16), y, "segmentation")


def _exp(model: dict) -> ExperimentConfig:
    return ExperimentConfig.from_dict(
        {
            "data": {"kind": "synthetic", "synthetic_samples": 100, "synthetic_size": 16},
            "model": model,
            "privacy": {"mode": "sample"},
        }
    )


def test_server_and_sites_build_the_same_dp_model() -> None:
    a, b = (
        build_experiment_model(_exp({"name": "cnn", "norm": "batch"})),
        build_experiment_model(_exp({"name": "cnn", "norm": "batch"})),
    )
    assert list(a.state_dict()) == list(b.state_dict())
    assert not any("running_mean" in k for k in a.state_dict())


def test_model_opacus_cannot_handle_is_a_clear_error() -> None:
    # MONAI's ResNet adds the residual in place, which Opacus' backward hooks cannot see through
    with pytest.raises(ConfigError, match="model.name: 'resnet18' cannot be trained with privacy.mode 'sample'"):
        build_experiment_model(_exp({"name": "resnet18"}))


def test_cnn_readouts_by_hand_per_sample_exact_and_bad_pool_names_the_choices() -> None:
    """``params.pool``: the head sees the last stage's spatial mean, maximum, or both (2x the features)."""
    from medflower.smallcnn import GlobalPool

    x = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]], [[-1.0, -4.0], [0.0, -3.0]]]])  # (1, 2 channels, 2, 2)
    torch.testing.assert_close(GlobalPool("avg")(x), torch.tensor([[3.0, -2.0]]))
    torch.testing.assert_close(GlobalPool("max")(x), torch.tensor([[6.0, 0.0]]))
    torch.testing.assert_close(GlobalPool("avgmax")(x), torch.tensor([[3.0, -2.0, 6.0, 0.0]]))
    torch.manual_seed(0)
    for spatial_dims, size in ((2, (16, 16)), (3, (8, 8, 8))):
        for pool, features in (("avg", 64), ("max", 64), ("avgmax", 128)):
            cfg = ModelConfig(name="cnn", spatial_dims=spatial_dims, params={"activation": "tanh", "pool": pool})
            model = build_model(cfg, in_channels=1, out_channels=2, img_size=size)
            assert model.head.in_features == features, (spatial_dims, pool)
    xs = torch.randn(4, 1, 16, 16)
    _assert_per_sample_grads_match(model, torch.randn(4, 1, 8, 8, 8), torch.tensor([0, 1, 1, 0]), "classification")
    # 'avg' is the network as it always was: the same state dict names, and a trunk loads across readouts
    avg = build_model(ModelConfig(name="cnn"), in_channels=1, out_channels=2, img_size=(16, 16))
    both = build_model(
        ModelConfig(name="cnn", params={"pool": "avgmax"}), in_channels=1, out_channels=2, img_size=(16, 16)
    )
    trunk = {k: v for k, v in avg.state_dict().items() if k.startswith("features.")}
    missing, unexpected = both.load_state_dict(trunk, strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and not unexpected
    torch.testing.assert_close(both.features(xs)[:, :64], avg.features(xs).flatten(1))
    with pytest.raises(ConfigError, match=r"pool must be one of avg, max, avgmax, got 'sum'"):
        build_model(ModelConfig(name="cnn", params={"pool": "sum"}), in_channels=1, out_channels=2, img_size=(16, 16))
