"""train.augment: flips/shifts keep shapes, move image and label map together, are seeded."""

from __future__ import annotations

import pytest
import torch

from medflower.client.augment import make_augment


def test_none_is_no_op() -> None:
    assert make_augment("none", seed=0) is None


def test_bad_choice_lists_valid_values() -> None:
    with pytest.raises(ValueError, match=r"train\.augment: invalid value 'rotate'; valid choices are 'none', 'flip'"):
        make_augment("rotate", seed=0)


def test_segmentation_masks_follow_images() -> None:
    x = torch.arange(4 * 1 * 8 * 8, dtype=torch.float32).reshape(4, 1, 8, 8)
    y = x.clone().long()  # a "label map" equal to the image: must stay equal after augmenting
    xa, ya = make_augment("flip+shift", seed=3)(x, y)
    assert xa.shape == x.shape and ya.shape == y.shape
    assert torch.equal(xa.long(), ya)
    assert not torch.equal(xa, x)  # something moved


def test_classification_labels_untouched_and_content_preserved_by_flip() -> None:
    x = torch.randn(16, 2, 6, 6)
    y = torch.arange(16)
    xa, ya = make_augment("flip", seed=1)(x, y)
    assert torch.equal(ya, y)
    for a, b in zip(xa, x, strict=True):  # each sample is one of its four flips
        assert any(torch.equal(a, f) for f in (b, b.flip(-1), b.flip(-2), b.flip(-1).flip(-2)))


def test_seeded() -> None:
    x = torch.randn(8, 1, 10, 10)
    y = torch.zeros(8, dtype=torch.long)
    a = make_augment("flip+shift", seed=5)(x, y)[0]
    b = make_augment("flip+shift", seed=5)(x, y)[0]
    c = make_augment("flip+shift", seed=6)(x, y)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_3d_volumes() -> None:
    x = torch.randn(2, 1, 4, 6, 6)
    y = (x > 0).long()
    xa, ya = make_augment("flip+shift", seed=0)(x, y)
    assert xa.shape == x.shape and torch.equal((xa > 0).long() * (xa != 0).long(), ya * (xa != 0).long())


# --- train.augment_multiplicity (augmentation multiplicity, De et al. 2022) -------------------------------


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))


def test_multiplicity_averages_per_sample_gradients_before_clipping() -> None:
    """Opacus' per-sample gradients of the K copies of an image become their mean: one row per image,
    computed here by hand with one plain backward pass per copy."""
    from opacus import GradSampleModule

    from medflower.client.train import average_copies

    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.5, -1.0], [2.0, 0.0]]], [[[-2.0, 1.0], [1.0, 1.0]]]])
    y = torch.tensor([0, 1, 1])
    k = 2
    xk, yk = x.repeat_interleave(k, 0), y.repeat_interleave(k, 0)
    xk = torch.where((torch.arange(len(xk)) % 2 == 1).view(-1, 1, 1, 1), xk.flip(-1), xk)  # copy 2: flipped
    model = _tiny_model()
    gsm = GradSampleModule(model)
    torch.nn.functional.cross_entropy(gsm(xk), yk).backward()
    average_copies(gsm, k)
    weight = model[1].weight
    assert weight.grad_sample.shape == (3, 2, 4)  # one row per image, not per copy
    for i in range(3):
        expected = torch.zeros_like(weight)
        for j in range(k):
            ref = _tiny_model()
            torch.nn.functional.cross_entropy(
                ref(xk[i * k + j : i * k + j + 1]), yk[i * k + j : i * k + j + 1]
            ).backward()
            expected += ref[1].weight.grad / k
        torch.testing.assert_close(weight.grad_sample[i], expected)


def test_multiplicity_trains_under_dp_and_counts_images_not_copies() -> None:
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from medflower.client.train import train_epochs

    x = torch.randn(10, 1, 2, 2)
    y = torch.randint(0, 2, (10,))
    model = _tiny_model()
    before = model[1].weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    gsm, dp_opt, dp_loader = PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.0, max_grad_norm=1.0, poisson_sampling=False
    )
    stats = train_epochs(
        gsm, dp_loader, dp_opt, epochs=1, task="classification", augment=make_augment("flip", seed=0), multiplicity=4
    )
    assert stats.num_examples == 10 and stats.num_steps == 2
    assert not torch.equal(model[1].weight, before)


def test_multiplicity_without_augment_is_an_error() -> None:
    from medflower.client.train import train_epochs
    from medflower.config.train import TrainConfig
    from medflower.schema import ConfigError

    with pytest.raises(ConfigError, match=r"train\.augment_multiplicity: 4 .*set train\.augment"):
        TrainConfig(augment_multiplicity=4)
    with pytest.raises(ValueError, match="multiplicity"):
        train_epochs(
            _tiny_model(),
            [],
            torch.optim.SGD(_tiny_model().parameters(), lr=0.1),
            epochs=1,
            task="classification",
            multiplicity=2,
        )


def test_shift_alone_moves_without_flipping() -> None:
    """``shift``: every sample is its original translated by at most 2 pixels (zero padded), never mirrored."""
    x = torch.arange(1, 1 + 6 * 1 * 8 * 8, dtype=torch.float32).reshape(6, 1, 8, 8)
    xa, _ = make_augment("shift", seed=2)(x, torch.zeros(6, dtype=torch.long))
    for a, b in zip(xa, x, strict=True):
        padded = torch.nn.functional.pad(b, (2, 2, 2, 2))
        windows = [padded[:, i : i + 8, j : j + 8] for i in range(5) for j in range(5)]
        assert any(torch.equal(a, w) for w in windows)
    assert not torch.equal(xa, x)
