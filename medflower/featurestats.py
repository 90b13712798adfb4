"""The head's input standardised by feature statistics the sites release under DP (``privacy.feature_stats_noise``).

What both sides share: the coordinator (:mod:`medflower.server.featurestats`) reads clipping bounds off synthetic
images and folds the released statistics into the head's fixed map; each site
(:mod:`medflower.client.featurestats`) releases clipped, noised sums of its training images' features.

Why: under DP-SGD a linear head on a prior's frozen features trains only as fast as its input is conditioned.
``model.whiten_features`` whitens that input with statistics of synthetic images (free, but fitted to the wrong
images): on VesselMNIST3D the real features, so whitened, still have a mean of norm 5.7 and spreads from 0.10 to
1.15 per coordinate. In the pooled DP-SGD simulation (bench/dp_head_sim.py, bench/RESULTS.md stage 31) the same
whitening followed by a per-coordinate standardisation from DP statistics (two Gaussian sums, noise multiplier 4,
the budget they spend taken from DP-SGD's) raised test AUC from 0.70-0.76 to 0.77-0.80 on VesselMNIST3D and from
0.81-0.83 to 0.85 on BreastMNIST. Federated it raised VesselMNIST3D's test AUC but not its validation AUC, and
lowered BreastMNIST's (stage 31), so it is opt-in and off by default.

The mechanism, per site and per release: each training image's whitened feature row is clipped to an L2 bound
(for the mean: the 99th percentile of the synthetic images' row norms; for the variance: their median distance
from their mean), the clipped rows (or their squared deviations from the federation's noisy mean) are summed and
Gaussian noise of ``noise_multiplier`` times the sum's L2 sensitivity (the bound; its square for the squared
deviations) is added: a Gaussian mechanism without sampling, charged to the site's ledger as
``(noise_multiplier, 1.0, 1)`` (Opacus' RDP/PRV history). The image count is treated as public, as DP-SGD's plan
already does (the sampling rate comes from it). Nothing in Flower, Opacus or MONAI releases feature statistics
under DP, hence written here.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from medflower.modelspec import WhitenedHead

MEAN_QUANTILE = 0.99  # the mean's clipping bound: this quantile of the synthetic rows' norms
SPREAD_QUANTILE = 0.5  # the variance's: this quantile of the synthetic rows' distances from their mean
VARIANCE_FLOOR = 0.1  # each variance is raised by this fraction of their mean (no coordinate blown up by noise)
SYNTHETIC_SAMPLES = 1024  # synthetic images the bounds are read off


def whitened_head(model: nn.Module) -> WhitenedHead:
    """The model's :class:`WhitenedHead` (``model.whiten_features``); a ValueError when it has none."""
    found = [m for m in model.modules() if isinstance(m, WhitenedHead)]
    if len(found) != 1:
        raise ValueError(f"model must hold exactly one WhitenedHead (model.whiten_features), found {len(found)}")
    return found[0]


def whitened_inputs(
    model: nn.Module, batches: Iterable[torch.Tensor], *, device: torch.device | None = None
) -> torch.Tensor:
    """``(n, d)``: what the head's linear layer sees for each image of ``batches``, ``(x - mean) @ transform``
    with the map ``model`` holds now (float32, on the CPU). The model runs in eval mode, without gradients."""
    head = whitened_head(model)
    rows: list[torch.Tensor] = []

    def capture(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].flatten(1).float()
        rows.append(((x - head.mean.float()) @ head.transform.float()).cpu())

    handle = head.register_forward_pre_hook(capture)
    model.eval()
    try:
        with torch.no_grad():
            for x in batches:
                model(x.to(device) if device is not None else x)
    finally:
        handle.remove()
    if not rows:
        raise ValueError("batches is empty: no features to compute statistics of")
    return torch.cat(rows)


def clip_rows(x: torch.Tensor, bound: float) -> torch.Tensor:
    """Each row of ``x`` scaled down to L2 norm ``bound`` when longer (the sum's sensitivity is then ``bound``)."""
    if not bound > 0:
        raise ValueError(f"bound must be > 0, got {bound}")
    return x * (bound / x.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)


def clipping_bounds(synthetic: torch.Tensor) -> tuple[float, float]:
    """(mean's bound, variance's bound) read off synthetic images' whitened rows (no data: no privacy cost)."""
    if synthetic.dim() != 2 or len(synthetic) < 2:
        raise ValueError(f"synthetic must be (n >= 2, d), got shape {tuple(synthetic.shape)}")
    norms = synthetic.norm(dim=1)
    spread = (synthetic - synthetic.mean(0)).norm(dim=1)
    return float(norms.quantile(MEAN_QUANTILE)), float(spread.quantile(SPREAD_QUANTILE))


def noised_sum(
    rows: torch.Tensor,
    *,
    stage: str,
    bound: float,
    noise_multiplier: float,
    generator: torch.Generator | None,
    centre: torch.Tensor | None = None,
) -> torch.Tensor:
    """One site's release (float64): the sum of its clipped rows (``stage`` 'mean') or of the squares of its rows'
    clipped deviations from ``centre`` ('var'), plus Gaussian noise of ``noise_multiplier`` times the sensitivity.
    ``generator`` None adds no noise (tests of the sums only)."""
    if stage == "mean":
        total, sensitivity = clip_rows(rows.double(), bound).sum(0), bound
    elif stage == "var":
        if centre is None or centre.shape != rows.shape[1:]:
            raise ValueError(f"centre must have shape {tuple(rows.shape[1:])} for stage 'var'")
        total, sensitivity = (clip_rows(rows.double() - centre.double(), bound) ** 2).sum(0), bound**2
    else:
        raise ValueError(f"stage must be one of 'mean', 'var', got {stage!r}")
    if generator is None:
        return total
    noise = torch.randn(total.shape, generator=generator, dtype=torch.float64, device=generator.device)
    return total + noise.cpu() * noise_multiplier * sensitivity


def spread_from(variance: torch.Tensor) -> torch.Tensor:
    """Per-coordinate standard deviation from a noisy variance: negatives (noise) set to 0, then every variance
    raised by :data:`VARIANCE_FLOOR` of their mean, so no coordinate is blown up by noise."""
    v = variance.double().clamp_min(0.0)
    return (v + VARIANCE_FLOOR * v.mean()).clamp_min(1e-12).sqrt()


def fold_standardisation(
    mean: torch.Tensor, transform: torch.Tensor, centre: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The head map ``(x - mean') @ transform'`` equal to ``((x - mean) @ transform - centre) / scale``.

    ``mean' = mean + centre @ transform^-1`` and ``transform' = transform / scale`` (column-wise), in float64: the
    state dict keeps its keys, so every site, checkpoint and ``model.pt`` carries the standardisation unchanged."""
    t = transform.double()
    shift = torch.linalg.solve(t.T, centre.double())  # centre @ t^-1, as a column solve
    return (mean.double() + shift).to(mean.dtype), (t / scale.double()[None, :]).to(transform.dtype)
