"""Acquisition (scanner) shift: apply a site's :class:`~medflower.config.shift.ShiftProfile` to its images.

Every operation is a MONAI transform (``RandBiasField``, ``Resize``, ``GibbsNoise``,
``KSpaceSpikeNoise``, ``GaussianSmooth``, ``AdjustContrast``, ``RandGaussianNoise``/``RandRicianNoise``);
this module only fixes what makes them a *scanner* rather than an augmentation:

* what belongs to the machine is drawn once per site and shared by all its images and splits: the
  bias field's coefficients and the k-space spike's position (seeded by experiment seed and site);
* what belongs to each acquisition is fresh per image: the noise (seeded by experiment seed, site and
  split, so that it is reproducible in every process that builds the sites);
* intensities are mapped from the data set's range to [0, 1] before and back after, with one fixed
  affine map for the whole data set, so that "intensity_scale 0.8" darkens a site relative to the others.

The same profile is applied to a site's train, val and test images (a hospital's test images come
from the same scanner as its training images). Images are processed as channel stacks, so the
k-space operations act on each image's spatial axes independently.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch

from medflower._preload import require_monai
from medflower.config import ExperimentConfig
from medflower.config.shift import ShiftProfile
from medflower.data import DatasetSplits

if TYPE_CHECKING:
    from monai.transforms import RandGaussianNoise, RandRicianNoise

SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}
_CHUNK = 512  # images per MONAI call (bounds memory for 3D volumes)


def _transforms() -> ModuleType:
    """``monai.transforms``, imported on first use: a run without scanner shift never needs MONAI here."""
    require_monai()
    from monai import transforms

    return transforms


def _state(*key: int) -> np.random.RandomState:
    """A MONAI-style RandomState from a tuple of ints (stable across processes, unlike ``hash``)."""
    return np.random.RandomState(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def value_range(images: np.ndarray) -> tuple[float, float]:
    """The fixed intensity window a data set is shifted in: its training images' min and max."""
    if images.size == 0:
        return 0.0, 1.0
    lo, hi = float(np.min(images)), float(np.max(images))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


class SiteScanner:
    """One site's scanner: fixed machine parameters plus per-image noise, deterministic in ``seed``/``site_index``."""

    def __init__(
        self,
        *,
        profile: ShiftProfile,
        seed: int,
        site_index: int,
        value_range: tuple[float, float],
        spatial_shape: Sequence[int],
    ) -> None:
        self.profile = profile
        self.seed, self.site_index = seed, site_index
        self.lo, self.hi = value_range
        self.spatial_shape = tuple(int(s) for s in spatial_shape)
        machine = _state(seed, 7919, site_index)
        self.bias = None
        if profile.bias_field > 0:
            self.bias = _transforms().RandBiasField(
                degree=profile.bias_degree, coeff_range=(-profile.bias_field, profile.bias_field), prob=1.0
            )
            self.bias.set_random_state(state=machine)
            self.bias.randomize(img_size=self.spatial_shape)
        # a spike away from the centre of k-space (the centre is the image's mean intensity)
        self.spike_loc = tuple(
            int(machine.randint(0, max(1, s // 4))) + s // 2 + max(1, s // 8) for s in self.spatial_shape
        )
        self.spike_loc = tuple(min(v, s - 1) for v, s in zip(self.spike_loc, self.spatial_shape, strict=True))

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = dict(self.profile.changed())
        if self.profile.kspace_spike > 0:
            out["spike_location"] = list(self.spike_loc)
        return out

    def apply(self, images: np.ndarray, split: str) -> np.ndarray:
        """Shift ``images`` ``(N, C, *spatial)`` of one split; returns a new float32 array."""
        if self.profile.is_identity() or len(images) == 0:
            return images
        if tuple(images.shape[2:]) != self.spatial_shape:
            raise ValueError(f"images of shape {images.shape[2:]} do not match the scanner's {self.spatial_shape}")
        noise_state = _state(self.seed, 7919, self.site_index, 1 + SPLIT_INDEX.get(split, 3))
        n, c = images.shape[:2]
        flat = images.reshape(n * c, *self.spatial_shape)
        out = np.empty_like(flat, dtype=np.float32)
        for i in range(0, len(flat), _CHUNK):
            out[i : i + _CHUNK] = self._apply_stack(flat[i : i + _CHUNK], channels=c, noise_state=noise_state)
        return out.reshape(images.shape)

    def _apply_stack(self, stack: np.ndarray, *, channels: int, noise_state: np.random.RandomState) -> np.ndarray:
        p = self.profile
        mt = _transforms()
        x = torch.from_numpy((stack.astype(np.float32) - self.lo) / (self.hi - self.lo))  # (K, *spatial) in [0, 1]
        if self.bias is not None:
            x = torch.as_tensor(self.bias(x, randomize=False))
        if p.downsample > 1.0:
            low = tuple(max(2, round(s / p.downsample)) for s in self.spatial_shape)
            x = torch.as_tensor(mt.Resize(low, mode="area")(x))
            x = torch.as_tensor(mt.Resize(self.spatial_shape, mode="bilinear" if len(low) == 2 else "trilinear")(x))
        if p.gibbs_alpha > 0:
            x = torch.as_tensor(mt.GibbsNoise(alpha=p.gibbs_alpha)(x))
        if p.kspace_spike > 0:
            # MONAI sets the spike's log-magnitude; an unnormalised FFT spreads it over every pixel
            k_intensity = float(np.log(p.kspace_spike * np.prod(self.spatial_shape)))
            x = torch.as_tensor(mt.KSpaceSpikeNoise(loc=self.spike_loc, k_intensity=k_intensity)(x))
        if p.blur_sigma > 0:
            x = mt.GaussianSmooth(sigma=p.blur_sigma)(x)
        x = torch.as_tensor(x, dtype=torch.float32)
        if p.gamma != 1.0:
            # per image (all its channels together): MONAI's gamma works on the image's own range
            x = x.clamp_min(0.0)
            contrast = mt.AdjustContrast(gamma=p.gamma)
            x = torch.cat([torch.as_tensor(contrast(x[i : i + channels])) for i in range(0, len(x), channels)])
        if p.noise_std > 0:
            noise: RandRicianNoise | RandGaussianNoise
            if p.noise == "rician":
                noise = mt.RandRicianNoise(prob=1.0, std=p.noise_std, sample_std=False)
            else:
                noise = mt.RandGaussianNoise(prob=1.0, std=p.noise_std, sample_std=False)
            noise.set_random_state(state=noise_state)
            x = torch.as_tensor(noise(x))
        x = x * p.intensity_scale + p.intensity_shift
        out = x.numpy().astype(np.float32) * (self.hi - self.lo) + self.lo
        return out


def site_scanners(exp: ExperimentConfig, ds: DatasetSplits, names: Sequence[str]) -> list[SiteScanner]:
    """The scanner of every site of ``exp`` (``ds``: its :class:`~medflower.data.DatasetSplits`)."""
    vr = value_range(ds.train.images)
    return [
        SiteScanner(
            profile=exp.shift.profile(name),
            seed=exp.seed,
            site_index=i,
            value_range=vr,
            spatial_shape=ds.train.images.shape[2:],
        )
        for i, name in enumerate(names)
    ]
