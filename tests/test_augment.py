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
