"""medflower prior: synthetic dead-leaves images, SimCLR's loss by hand, a seeded trunk that fits model.init."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from monai.networks.nets import DenseNet121

from medflower.cli import main as cli_main
from medflower.config import ExperimentConfig, load_experiment, quickstart_experiment
from medflower.config.data import DataConfig
from medflower.data.medmnist import _to_nchw
from medflower.modelspec import build_experiment_model, initial_model, model_spec
from medflower.prior import dead_leaves, last_linear, nt_xent, pretrain_prior, to_data_intensity, trunk_prefixes
from medflower.schema import ConfigError
from medflower.smallcnn import SmallCNN


@pytest.mark.parametrize("textured", [False, True])
def test_dead_leaves_are_images_in_range_and_seeded(textured: bool) -> None:
    a = dead_leaves(3, size=(16, 12), channels=2, generator=torch.Generator().manual_seed(1), textured=textured)
    b = dead_leaves(3, size=(16, 12), channels=2, generator=torch.Generator().manual_seed(1), textured=textured)
    assert a.shape == (3, 2, 16, 12)
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert len(a.unique()) > 10  # many shapes, not a flat image


def test_dead_leaves_in_3d() -> None:
    x = dead_leaves(2, size=(8, 8, 8), channels=1, generator=torch.Generator().manual_seed(0), shapes=10)
    assert x.shape == (2, 1, 8, 8, 8)


def test_synthetic_views_get_the_intensities_the_data_preparation_gives() -> None:
    """Each data.kind / data.intensity, against the preparation real images get (MedMNIST's loader, MONAI's
    transforms as medflower.data.readers applies them, per image)."""
    import monai.transforms as mt

    x = dead_leaves(3, size=(8, 8), channels=2, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.1
    u8 = (x * 255).round().to(torch.uint8)
    medmnist = DataConfig(kind="medmnist", path="x.npz")
    want = torch.from_numpy(_to_nchw(u8[:, 0].numpy(), Path("x.npz"), "train_images"))  # grey (N, rows, columns)
    assert torch.allclose(to_data_intensity(u8[:, :1].float() / 255, medmnist), want, atol=1e-6)
    files = lambda intensity, **kw: DataConfig(kind="folders", path="d", intensity=intensity, **kw)  # noqa: E731
    for i in range(3):
        got = to_data_intensity(x, files("minmax"))[i]
        assert torch.allclose(got, torch.as_tensor(mt.ScaleIntensity(minv=0.0, maxv=1.0)(x[i])), atol=1e-6)
        got = to_data_intensity(x, files("zscore"))[i]
        assert torch.allclose(got, torch.as_tensor(mt.NormalizeIntensity(channel_wise=True)(x[i])), atol=1e-5)
    assert to_data_intensity(x * 1.5 - 0.2, files("window", window=(0, 255))).min() == 0  # clipped as the reader
    assert torch.equal(to_data_intensity(x, files("none")), x)


def test_nt_xent_by_hand() -> None:
    """Two images, both views equal one-hot vectors, temperature 1: each view scores its partner e^1 and
    the two others e^0, so the loss is -log(e / (e + 2)) for all four."""
    z = torch.eye(2)
    assert nt_xent(z, z.clone(), temperature=1.0).item() == pytest.approx(math.log(1 + 2 / math.e), rel=1e-6)


def test_the_head_is_the_last_linear_layer_and_the_rest_is_the_trunk() -> None:
    model = SmallCNN(spatial_dims=2, in_channels=1, out_channels=2)
    parent, attr = last_linear(model)
    assert parent is model and attr == "head"
    assert trunk_prefixes(model) == ["features"]
    dense = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)  # head nested: class_layers.out
    assert trunk_prefixes(dense) == ["features"]  # class_layers holds no other parameter
    with pytest.raises(ConfigError, match="no nn.Linear head"):
        last_linear(torch.nn.Conv2d(1, 1, 3))


def _tiny() -> ExperimentConfig:
    exp = quickstart_experiment()
    return replace(exp, data=replace(exp.data, synthetic_samples=60))


def test_pretraining_is_seeded_learns_and_keeps_the_seeded_head() -> None:
    losses: list[float] = []
    a = pretrain_prior(_tiny(), steps=40, batch_size=32, seed=3, progress=lambda s, loss: losses.append(loss))
    b = pretrain_prior(_tiny(), steps=40, batch_size=32, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses[-1] < losses[0] - 0.1  # NT-Xent falls (4.12 -> 3.96 here): views of one image pair up
    torch.manual_seed(3)
    seeded = build_experiment_model(_tiny()).state_dict()
    assert torch.equal(a["head.weight"], seeded["head.weight"])
    assert not torch.equal(a["features.0.weight"], seeded["features.0.weight"])


def test_pretraining_feeds_the_network_the_data_s_intensities(monkeypatch: pytest.MonkeyPatch) -> None:
    """A file-kind experiment with per-image z-scores: every view the trunk sees during pretraining has mean 0
    and sd 1 per image and channel (raw dead leaves lie in [0, 1], mean ~0.5). The network and image size come
    from the synthetic quick start (no folder is read); only ``data`` tells the prior the intensities."""
    import medflower.prior as prior_module

    tiny = _tiny()
    seen: list[torch.Tensor] = []

    def recording(e: ExperimentConfig) -> torch.nn.Module:
        m = build_experiment_model(replace(tiny, model=e.model))
        m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
        return m

    monkeypatch.setattr(prior_module, "build_experiment_model", recording)
    monkeypatch.setattr(prior_module, "model_spec", lambda _e: model_spec(tiny))
    exp = replace(tiny, data=DataConfig(kind="folders", path="unused", intensity="zscore"))
    pretrain_prior(exp, steps=2, batch_size=8)
    views = seen[1:]  # the first forward is the zero image that measures the trunk's width
    assert len(views) == 4  # 2 steps x 2 views
    for v in views:
        assert torch.allclose(v.mean(dim=(2, 3)), torch.zeros(v.shape[:2]), atol=1e-5)
        assert torch.allclose(v.std(dim=(2, 3), unbiased=False), torch.ones(v.shape[:2]), atol=1e-4)


def test_the_file_fits_model_init_and_freeze(tmp_path: Path) -> None:
    """The CLI end to end: the file it writes starts a run whose trunk is then frozen."""
    exp_yaml = tmp_path / "exp.yaml"
    exp_yaml.write_text("data: {kind: synthetic, synthetic_samples: 60}\nmodel: {name: cnn}\n")
    assert (
        cli_main(["prior", str(exp_yaml), "-o", str(tmp_path / "prior.pt"), "--steps", "2", "--batch-size", "8"]) == 0
    )
    exp = _tiny()
    exp = replace(exp, model=replace(exp.model, init=str(tmp_path / "prior.pt"), freeze=("features",)))
    model = initial_model(exp)
    state = torch.load(tmp_path / "prior.pt", weights_only=True)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]


def test_segmentation_is_refused() -> None:
    exp = _tiny()
    with pytest.raises(ConfigError, match="classification networks only"):
        pretrain_prior(replace(exp, task="segmentation"), steps=1)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "bench" / "priors").glob("*.yaml")))
def test_the_benchmark_priors_are_experiments(path: Path) -> None:
    """bench/priors/*.yaml are what `medflower prior` reads (bench/RESULTS.md), not sweeps: they must load."""
    assert load_experiment(path).task == "classification"


def test_the_experiment_s_own_freeze_does_not_stop_pretraining() -> None:
    """`medflower prior examples/breastmnist_dp_prior.yaml`: that experiment freezes the very trunk the prior
    pretrains; the prior must be the same as for the unfrozen network."""
    exp = _tiny()
    frozen = replace(exp, model=replace(exp.model, freeze=("features",)))
    a = pretrain_prior(frozen, steps=3, batch_size=8, seed=1)
    b = pretrain_prior(exp, steps=3, batch_size=8, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(1)
    assert not torch.equal(a["features.0.weight"], build_experiment_model(exp).state_dict()["features.0.weight"])
