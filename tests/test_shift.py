"""Scanner shift: deterministic per seed and site, the same machine for every split, each parameter does what
it says."""

from __future__ import annotations

import numpy as np
import pytest

from medflower.config import ConfigError, ExperimentConfig
from medflower.config.shift import PRESETS, ShiftProfile, preset_profile
from medflower.simulation.shift import SiteScanner

LOW, HIGH = -1.0, 1.0


def images(n: int = 8, size: int = 16, seed: int = 0, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 0.4 * np.sin(6 * xx) * np.cos(4 * yy)
    x = base[None, None] + 0.2 * rng.standard_normal((n, channels, size, size))
    return np.clip(x, LOW, HIGH).astype(np.float32)


def scanner(profile: ShiftProfile, *, seed: int = 0, site: int = 0, size: int = 16) -> SiteScanner:
    return SiteScanner(profile=profile, seed=seed, site_index=site, value_range=(LOW, HIGH), spatial_shape=(size, size))


def exp_with(shift: dict, seed: int = 0, **partition) -> ExperimentConfig:
    return ExperimentConfig.from_dict(
        {
            "seed": seed,
            "data": {"kind": "synthetic", "synthetic_samples": 120},
            "partition": {"kind": "iid", "num_sites": 3, "min_site_size": 5, **partition},
            "shift": shift,
        }
    )


def test_same_seed_same_images_different_seed_or_site_differs() -> None:
    x = images()
    strong = preset_profile("strong")
    a = scanner(strong, seed=1, site=2).apply(x, "train")
    b = scanner(strong, seed=1, site=2).apply(x, "train")
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, scanner(strong, seed=2, site=2).apply(x, "train"))
    assert not np.allclose(a, scanner(strong, seed=1, site=1).apply(x, "train"))  # another hospital's machine
    assert not np.allclose(a, x)


def test_identity_profile_returns_the_images_untouched() -> None:
    x = images()
    assert scanner(ShiftProfile()).apply(x, "train") is x
    assert ShiftProfile().is_identity() and not preset_profile("mild").is_identity()


def test_bias_field_is_the_machine_shared_by_every_image_and_split() -> None:
    """Bias only: (shifted - low) / (original - low) is one fixed field, in train and test alike."""
    sc = scanner(ShiftProfile(bias_field=0.5))
    tr, te = images(seed=1) + 1.5, images(seed=2) + 1.5  # strictly above the window's low end
    f_tr = (sc.apply(tr, "train") - LOW) / (tr - LOW)
    f_te = (sc.apply(te, "test") - LOW) / (te - LOW)
    np.testing.assert_allclose(f_tr, np.broadcast_to(f_tr[0], f_tr.shape), rtol=1e-4)
    np.testing.assert_allclose(f_te[0], f_tr[0], rtol=1e-4)
    assert f_tr[0].std() > 0.01  # a real, spatially varying field


def test_noise_is_fresh_per_image_and_per_split() -> None:
    x = np.zeros((4, 1, 16, 16), np.float32)
    sc = scanner(ShiftProfile(noise_std=0.1))
    tr, te = sc.apply(x, "train"), sc.apply(x, "test")
    assert not np.allclose(tr[0], tr[1]) and not np.allclose(tr, te)
    # noise of std 0.1 in [0, 1] units is 0.2 in a [-1, 1] data set
    assert (tr - x).std() == pytest.approx(0.2, rel=0.15)


@pytest.mark.parametrize(
    "profile, check",
    [
        (
            ShiftProfile(intensity_scale=0.5),
            lambda x, y: (y - LOW).mean() == pytest.approx(0.5 * (x - LOW).mean(), rel=1e-4),
        ),
        (ShiftProfile(intensity_shift=0.25), lambda x, y: (y - x).mean() == pytest.approx(0.5, rel=1e-4)),
        (ShiftProfile(gamma=2.0), lambda x, y: y.mean() < x.mean() - 0.05),
        (
            ShiftProfile(blur_sigma=1.5),
            lambda x, y: np.abs(np.diff(y, axis=-1)).mean() < 0.6 * np.abs(np.diff(x, axis=-1)).mean(),
        ),
        (
            ShiftProfile(downsample=4.0),
            lambda x, y: np.abs(np.diff(y, axis=-1)).mean() < 0.6 * np.abs(np.diff(x, axis=-1)).mean(),
        ),
        (ShiftProfile(gibbs_alpha=0.6), lambda x, y: 0.02 < np.abs(y - x).mean() < 0.3),
        (ShiftProfile(kspace_spike=0.2), lambda x, y: np.abs(np.fft.fft2((y - x)[:, 0])).max(axis=(1, 2)).min() > 20),
        (ShiftProfile(noise="rician", noise_std=0.05), lambda x, y: y.std() > x.std()),
    ],
)
def test_each_parameter_changes_images_as_documented(profile: ShiftProfile, check) -> None:
    x = images()
    y = scanner(profile).apply(x, "train")
    assert y.shape == x.shape and y.dtype == np.float32
    assert check(x, y)


def test_rgb_and_3d_images_keep_their_shape() -> None:
    rgb = images(channels=3)
    out = scanner(preset_profile("mr-old-scanner")).apply(rgb, "val")
    assert out.shape == rgb.shape
    vol = np.random.default_rng(0).random((2, 1, 8, 8, 8)).astype(np.float32)
    sc3 = SiteScanner(
        profile=preset_profile("strong"), seed=0, site_index=0, value_range=(0.0, 1.0), spatial_shape=(8, 8, 8)
    )
    assert sc3.apply(vol, "train").shape == vol.shape


def test_build_sites_shifts_named_sites_in_every_split_deterministically() -> None:
    from medflower.simulation.sites import _build, build_sites

    plain = build_sites(exp_with({}))
    exp = exp_with({"sites": {"site-1": "strong", "site-2": {"preset": "mild", "noise_std": 0.1}}})
    shifted = build_sites(exp)
    _build.cache_clear()
    again = build_sites(exp)  # rebuilt from scratch, as another process would
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(shifted[0].split(split).images, plain[0].split(split).images)
        np.testing.assert_array_equal(shifted[0].split(split).targets, plain[0].split(split).targets)
        for s in (1, 2):
            assert not np.allclose(shifted[s].split(split).images, plain[s].split(split).images)
            np.testing.assert_array_equal(shifted[s].split(split).images, again[s].split(split).images)
    assert shifted[2].info["scanner"]["noise_std"] == 0.1 and shifted[2].info["preset"] == "mild"
    other_seed = build_sites(exp_with({"sites": {"site-1": "strong"}}, seed=1))
    assert not np.array_equal(other_seed[1].train.images[:5], shifted[1].train.images[:5])


def test_shift_yaml_forms_round_trip_and_errors_name_the_key() -> None:
    exp = exp_with({"sites": {"site-0": "ct-low-dose", "site-2": {"preset": "strong", "gamma": 0.8}}})
    assert exp.shift.profile("site-2") == ShiftProfile(**{**PRESETS["strong"], "gamma": 0.8})
    assert exp.shift.profile("site-1").is_identity()
    assert ExperimentConfig.from_json(exp.to_json()) == exp
    with pytest.raises(
        ConfigError,
        match=r"shift\.sites\.site-5: no such site; with partition\.num_sites=3 the "
        r"sites are site-0, site-1, site-2",
    ):
        exp_with({"sites": {"site-5": "strong"}})
    with pytest.raises(
        ConfigError,
        match=r"shift\.sites\.site-1: unknown preset 'strng'; valid presets are none, mild, "
        r"strong",
    ):
        exp_with({"sites": {"site-1": "strng"}})
    with pytest.raises(ConfigError, match=r"shift\.sites\.site-1\.preset: unknown preset 'x'"):
        exp_with({"sites": {"site-1": {"preset": "x"}}})
    with pytest.raises(ConfigError, match=r"shift\.sites\.site-1\.gamma: must be > 0"):
        exp_with({"sites": {"site-1": {"gamma": 0}}})
    with pytest.raises(ConfigError, match=r"unknown key shift\.sites\.site-1\.sigma; valid keys here are .*blur_sigma"):
        exp_with({"sites": {"site-1": {"sigma": 1}}})
