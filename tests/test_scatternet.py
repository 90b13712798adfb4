"""``model.name: scatternet``: fixed scattering features (kymatio) and a small trained head."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
from opacus import GradSampleModule

from medflower.client.train import make_loader, train_epochs
from medflower.config import ConfigError, ModelConfig
from medflower.data import ArraySplit
from medflower.models import build_model, count_parameters
from medflower.tasks import make_loss

pytest.importorskip("kymatio", reason="kymatio is not installed: pip install 'medflower[scatter]'")


def _build(size=(28, 28), in_channels: int = 1, **params) -> torch.nn.Module:
    return build_model(
        ModelConfig(name="scatternet", params=params), in_channels=in_channels, out_channels=2, img_size=size
    )


@pytest.mark.parametrize("head", ["cnn", "linear"])
def test_only_the_head_is_trained_and_sent(head: str) -> None:
    model = _build(in_channels=3, head=head)
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 2)
    assert not list(model.scattering.parameters())  # fixed filters
    assert all(k.startswith(("norm.", "head.")) for k in model.state_dict())  # nor in the state dict
    assert model.norm.num_channels == 3 * 81  # 81 scattering maps per input channel at j = 2
    if head == "linear":
        assert count_parameters(model) == 2 * 243 + (243 * 7 * 7 + 1) * 2


def test_the_same_seed_builds_the_same_head_and_loads_its_state() -> None:
    torch.manual_seed(0)
    a = _build()
    torch.manual_seed(0)
    b = _build()
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    b.load_state_dict(a.state_dict())  # strict: sites load what the coordinator sends


def test_opacus_per_sample_gradients_are_exact() -> None:
    torch.manual_seed(0)
    model = _build(size=(16, 16), width=8)
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 1, 0])
    loss_fn = make_loss("classification")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm = GradSampleModule(model, loss_reduction="mean")
        loss_fn(gsm(x), y).backward()
    got = {n: p.grad_sample.detach().clone() for n, p in model.named_parameters()}
    gsm.disable_hooks()
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss_fn(model(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(got[n][i], p.grad, rtol=1e-4, atol=1e-6, msg=f"{n}, sample {i}")
    gsm._close()


def _synthetic_stripes(n: int, seed: int) -> ArraySplit:
    """SYNTHETIC: horizontal (class 0) or vertical (class 1) stripes of random phase, in noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    grid = np.arange(16, dtype=np.float32)
    x = np.empty((n, 1, 16, 16), np.float32)
    for i, c in enumerate(y):
        wave = np.sin(grid * 1.5 + rng.uniform(0, 2 * np.pi))
        x[i, 0] = wave[:, None] if c == 0 else wave[None, :]
    return ArraySplit(x + rng.normal(0, 0.5, x.shape).astype(np.float32), y.astype(np.int64))


def test_it_learns_oriented_texture() -> None:
    torch.manual_seed(0)
    model = _build(size=(16, 16), width=8)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    train_epochs(model, make_loader(_synthetic_stripes(128, 0), 32, 0), opt, epochs=5, task="classification")
    test = _synthetic_stripes(200, 1)
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(test.images)).argmax(1).numpy()
    assert (pred == test.targets).mean() > 0.9


@pytest.mark.parametrize(
    "spatial_dims, size, params, match",
    [
        (3, (16, 16, 16), {}, "spatial_dims: the scattering front end is 2D"),
        (2, (28, 28), {"head": "mlp"}, "head must be one of linear, cnn, got 'mlp'"),
        (2, (30, 30), {}, r"j: the image size \[30, 30\] must be a multiple of 2\^j = 4"),
        (2, (28, 28), {"wavelets": 3}, "wavelets"),
    ],
)
def test_bad_settings_name_the_argument(spatial_dims: int, size: tuple, params: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_model(
            ModelConfig(name="scatternet", spatial_dims=spatial_dims, params=params),
            in_channels=1,
            out_channels=2,
            img_size=size,
        )


def test_without_kymatio_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "kymatio.scattering2d.frontend.torch_frontend", None)
    with pytest.raises(ConfigError, match=r"'scatternet' needs kymatio .*medflower\[scatter\]"):
        _build()
