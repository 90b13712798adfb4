"""``shift:`` — acquisition (scanner) shift per simulated site (applied by :mod:`medflower.simulation.shift`).

Real hospitals differ in their scanners as well as their patients: coil sensitivity (bias field),
noise level, reconstruction sharpness, resolution, contrast curves, MR artefacts. A site's profile
names a preset and may override any of its parameters::

    shift:
      sites:
        site-1: strong
        site-3: {preset: mr-old-scanner, noise_std: 0.1}

The presets are data, here, so that a reader sees every number (``medflower partition`` prints the
resolved profile of each site). Intensities are in the data set's range mapped to [0, 1] (its
training images' minimum -> 0, maximum -> 1), so the same preset means the same on any data set.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from medflower.schema import ConfigError, from_dict, rng_field

NoiseKind = Literal["gaussian", "rician"]


@dataclass(frozen=True)
class ShiftProfile:
    """The resolved acquisition parameters of one site; the defaults change nothing.

    Applied in this order (acquisition, then reconstruction, then display):
    bias field -> lower resolution -> Gibbs ringing -> k-space spike -> blur -> gamma -> noise ->
    intensity scale and shift.
    """

    bias_field: float = rng_field(0.0, min=0.0, max=2.0)  # Legendre coefficients drawn from (-b, b), fixed per site
    bias_degree: int = rng_field(3, min=1, max=6)
    downsample: float = rng_field(1.0, min=1.0, max=16.0)  # acquire at size/downsample, interpolate back
    gibbs_alpha: float = rng_field(0.0, min=0.0, max=1.0)  # MONAI GibbsNoise: share of k-space truncated
    kspace_spike: float = rng_field(0.0, min=0.0, max=1.0)  # MONAI KSpaceSpikeNoise: stripe amplitude; 0 = off
    blur_sigma: float = rng_field(0.0, min=0.0, max=10.0)  # Gaussian smoothing, pixels
    gamma: float = rng_field(1.0, min=0.0, exclusive_min=True, max=10.0)  # MONAI AdjustContrast
    noise: NoiseKind = "gaussian"
    noise_std: float = rng_field(0.0, min=0.0, max=1.0)  # per image, fresh noise for every image
    intensity_scale: float = rng_field(1.0, min=0.0, exclusive_min=True, max=10.0)
    intensity_shift: float = rng_field(0.0, min=-1.0, max=1.0)

    def is_identity(self) -> bool:
        return self == ShiftProfile()

    def changed(self) -> dict[str, Any]:
        """The parameters that differ from the identity profile (what a table shows)."""
        base = ShiftProfile()
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(base, f.name)}


# Named presets: every number visible. "strong" is meant to be clearly identifiable by a classifier.
PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    "mild": {"bias_field": 0.1, "gamma": 1.2, "noise_std": 0.02, "intensity_scale": 1.05},
    "strong": {
        "bias_field": 0.4,
        "blur_sigma": 0.7,
        "gamma": 1.6,
        "noise_std": 0.06,
        "intensity_scale": 0.8,
        "intensity_shift": 0.1,
    },
    "low-resolution": {"downsample": 2.0, "blur_sigma": 0.3},
    "ct-low-dose": {"noise_std": 0.1, "blur_sigma": 0.5},
    "mr-old-scanner": {"bias_field": 0.3, "downsample": 1.5, "gibbs_alpha": 0.4, "noise": "rician", "noise_std": 0.05},
    "mr-spike": {"kspace_spike": 0.1, "noise": "rician", "noise_std": 0.03},
    "bright-high-contrast": {"gamma": 0.6, "intensity_scale": 1.25, "intensity_shift": -0.05},
}


def preset_profile(name: str, where: str = "shift preset") -> ShiftProfile:
    if name not in PRESETS:
        raise ConfigError(f"{where}: unknown preset {name!r}; valid presets are " + ", ".join(PRESETS))
    return from_dict(ShiftProfile, PRESETS[name], f"preset {name}")


@dataclass(frozen=True)
class SiteShift:
    """A site's entry: a preset plus overrides (``None`` = the preset's value)."""

    preset: str = "none"
    bias_field: float | None = rng_field(None, min=0.0, max=2.0)
    bias_degree: int | None = rng_field(None, min=1, max=6)
    downsample: float | None = rng_field(None, min=1.0, max=16.0)
    gibbs_alpha: float | None = rng_field(None, min=0.0, max=1.0)
    kspace_spike: float | None = rng_field(None, min=0.0, max=1.0)
    blur_sigma: float | None = rng_field(None, min=0.0, max=10.0)
    gamma: float | None = rng_field(None, min=0.0, exclusive_min=True, max=10.0)
    noise: NoiseKind | None = None
    noise_std: float | None = rng_field(None, min=0.0, max=1.0)
    intensity_scale: float | None = rng_field(None, min=0.0, exclusive_min=True, max=10.0)
    intensity_shift: float | None = rng_field(None, min=-1.0, max=1.0)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"preset: unknown preset {self.preset!r}; valid presets are " + ", ".join(PRESETS))

    def resolve(self) -> ShiftProfile:
        overrides = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "preset" and getattr(self, f.name) is not None
        }
        return replace(preset_profile(self.preset), **overrides)


@dataclass(frozen=True)
class ShiftConfig:
    """Per-site acquisition profiles, keyed by site name (``site-0``...); unnamed sites are unshifted.

    A value is a preset name or a mapping ``{preset: ..., <parameter>: ...}``. Site names are
    checked against ``partition.num_sites`` by :class:`medflower.config.ExperimentConfig`.
    """

    sites: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        norm: dict[str, SiteShift] = {}
        for name, value in self.sites.items():
            where = f"shift.sites.{name}"
            if isinstance(value, SiteShift):
                norm[name] = value
            elif isinstance(value, str):
                if value not in PRESETS:
                    raise ConfigError(f"{where}: unknown preset {value!r}; valid presets are " + ", ".join(PRESETS))
                norm[name] = SiteShift(preset=value)
            elif isinstance(value, dict):
                try:
                    norm[name] = from_dict(SiteShift, value, where)
                except ConfigError as err:
                    msg = str(err)
                    raise ConfigError(
                        msg if msg.startswith(where) or "unknown key" in msg else f"{where}.{msg}"
                    ) from err
            else:
                raise ConfigError(f"{where}: expected a preset name or a mapping, got {type(value).__name__} {value!r}")
        object.__setattr__(self, "sites", norm)

    def check_sites(self, num_sites: int) -> None:
        """Every named site must exist (a typo would silently leave a site unshifted)."""
        valid = [f"site-{i}" for i in range(num_sites)]
        for name in self.sites:
            if name not in valid:
                shown = ", ".join(valid[:8]) + (", ..." if len(valid) > 8 else "")
                raise ConfigError(
                    f"shift.sites.{name}: no such site; with partition.num_sites={num_sites} the sites are {shown}"
                )

    def profile(self, site: str) -> ShiftProfile:
        entry = self.sites.get(site)
        return entry.resolve() if entry is not None else ShiftProfile()
