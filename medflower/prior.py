"""A data-free prior: a classifier's feature trunk pretrained on synthetic images (``medflower prior``).

Why: DP-SGD on a few hundred images per site loses most of what training without DP reaches (bench/RESULTS.md,
stages 1-13 of the DP recipe search), and the DP literature closes that gap with features learned on public
images, DP-SGD then training only a small head. Hospitals rarely hold public images of their own kind, so this
module learns features from **synthetic** images instead (Tang et al., NeurIPS 2023, "Differentially private
image classification by learning priors from random processes"; Baradad et al., NeurIPS 2021, "Learning to see
by looking at noise"): the experiment's network, built exactly as the run builds it (DP adaptations included),
learns its trunk by contrastive learning (SimCLR's NT-Xent loss, two augmented views per image) on dead-leaves
images: occluding discs and squares (balls and cubes in 3D) of random intensity whose sizes follow the r^-3 law
of natural images. No data takes part, so the weights cost no privacy budget and any site may receive them.
Use them with ``model.init`` and, to train only the head (linear probing), ``model.freeze: [features]``.

Nothing in Flower, MONAI or Opacus generates such images or pretrains this way, hence written here. The head
(the network's last linear layer) is set aside during pretraining and keeps its seeded random initialisation.

The synthetic images reach the network in the intensity range the experiment's data preparation gives real
images (:func:`to_data_intensity`: MedMNIST's [-1, 1], the file readers' [0, 1] or per-image z-scores): a trunk
pretrained on [0, 1] and then fed [-1, 1] MedMNIST images lost 0.03 AUC of its linear probe on BreastMNIST
(bench/RESULTS.md, stage 20). The mapping is fixed per ``data.kind``/``data.intensity`` (or per image), never
fitted to the data, so the prior stays data-free.

With ``model.whiten_features`` the prior also fits the head's whitening (:class:`medflower.modelspec.WhitenedHead`)
on the trunk's features of synthetic images (:func:`whitening`), again without reading data: DP-SGD's clipped,
isotropically noised steps train a head on centred, unit-scale features faster than on the raw pooled tanh features,
whose common mean dominates their norm (bench/RESULTS.md, stage 24).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from medflower.config import ExperimentConfig
from medflower.config.data import FILE_KINDS, DataConfig
from medflower.device import resolve_device
from medflower.modelspec import WhitenedHead, build_experiment_model, head_name, last_linear, model_spec
from medflower.schema import ConfigError

__all__ = [
    "augment",
    "dead_leaves",
    "last_linear",
    "load_trunk",
    "nt_xent",
    "pretrain_prior",
    "synthetic_features",
    "to_data_intensity",
    "trunk_prefixes",
    "whitening",
]


def dead_leaves(
    n: int,
    *,
    size: tuple[int, ...],
    channels: int,
    generator: torch.Generator,
    shapes: int = 60,
    textured: bool = False,
) -> torch.Tensor:
    """``n`` synthetic dead-leaves images ``(n, channels, *size)`` in [0, 1]: ``shapes`` discs/squares
    (balls/cubes in 3D), each drawn over the previous ones, radius r in [1, min(size)/2] with density
    proportional to r^-3, one random intensity per channel and shape, on a random background.
    ``textured``: each shape also carries an oriented sinusoidal grating of random frequency, direction,
    phase and amplitude (Baradad et al.'s "dead leaves with textures")."""
    dims = len(size)
    lead = (n, channels) + (1,) * dims
    img = torch.rand(lead, generator=generator).expand((n, channels, *size)).clone()
    coords = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in size], indexing="ij"))
    rmin, rmax = 1.0, min(size) / 2
    one = (n,) + (1,) * dims
    for _ in range(shapes):
        u = torch.rand(n, generator=generator)
        r = (rmin**-2 - u * (rmin**-2 - rmax**-2)) ** -0.5  # inverse CDF of the r^-3 density
        centre = torch.rand(n, dims, generator=generator) * torch.tensor(size, dtype=torch.float32)
        colour = torch.rand(lead, generator=generator)
        disc = torch.rand(n, generator=generator) < 0.5
        d = coords.unsqueeze(0) - centre.view((n, dims) + (1,) * dims)
        inside_disc = (d**2).sum(1).sqrt() < r.view(one)
        inside_square = d.abs().amax(1) < (r / 1.4).view(one)
        mask = torch.where(disc.view(one), inside_disc, inside_square).unsqueeze(1)
        fill = colour
        if textured:
            direction = F.normalize(torch.randn(n, dims, generator=generator), dim=1).view((n, dims) + (1,) * dims)
            freq = (0.2 + 1.3 * torch.rand(n, generator=generator)).view(one)
            phase = (6.2832 * torch.rand(n, generator=generator)).view(one)
            amp = (0.5 * torch.rand(n, generator=generator)).view(one)
            wave = amp * torch.sin(freq * (d * direction).sum(1) + phase)
            fill = (colour + wave.unsqueeze(1)).clamp(0, 1)
        img = torch.where(mask, fill, img)
    return img


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One SimCLR view: a random resized crop (scale 0.5-1, per axis mirrored at random), then random gamma,
    contrast, brightness and Gaussian noise."""
    n, dims = x.shape[0], x.dim() - 2
    scale = 0.5 + 0.5 * torch.rand(n, generator=generator)
    shift = (torch.rand(n, dims, generator=generator) * 2 - 1) * (1 - scale).unsqueeze(1)
    theta = torch.zeros(n, dims, dims + 1)
    for i in range(dims):
        flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        theta[:, i, i] = scale * flip
        theta[:, i, dims] = shift[:, i]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x, grid, align_corners=False, padding_mode="reflection").clamp(0, 1)
    b = (n,) + (1,) * (dims + 1)
    y = y ** torch.exp((torch.rand(b, generator=generator) - 0.5) * 0.8)
    y = (y - 0.5) * (0.6 + 0.8 * torch.rand(b, generator=generator)) + 0.5
    y = y + (torch.rand(b, generator=generator) - 0.5) * 0.4
    return y + torch.randn(y.shape, generator=generator) * 0.05 * torch.rand(b, generator=generator)


def to_data_intensity(x: torch.Tensor, data: DataConfig) -> torch.Tensor:
    """Synthetic views (about [0, 1]) brought to the intensities ``data``'s preparation gives real images.

    medmnist: uint8/127.5 - 1, so [0, 1] maps to [-1, 1] (:mod:`medflower.data.medmnist`); file kinds
    (:mod:`medflower.data.readers`): ``minmax`` scales each image to [0, 1], ``zscore`` each image and channel
    to mean 0, sd 1, ``window`` clips to [0, 1]; ``none`` (the stored values, whose range only the data know) and
    the ``synthetic`` kinds' float blobs: unchanged. Per image or fixed, never a statistic of the data set: the
    prior stays data-free.
    """
    if data.kind == "medmnist":
        return x * 2.0 - 1.0
    if data.kind not in FILE_KINDS:
        return x
    dims = tuple(range(2, x.dim()))
    if data.intensity == "minmax":
        lo, hi = x.amin(dim=(1, *dims), keepdim=True), x.amax(dim=(1, *dims), keepdim=True)
        return (x - lo) / (hi - lo).clamp_min(1e-6)
    if data.intensity == "zscore":
        return (x - x.mean(dim=dims, keepdim=True)) / x.std(dim=dims, keepdim=True, unbiased=False).clamp_min(1e-6)
    if data.intensity == "window":
        return x.clamp(0.0, 1.0)
    return x


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """SimCLR's loss: each view must pick its partner among the other 2n - 1 views (cosine / temperature)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    n = len(z1)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, partner)


def trunk_prefixes(model: nn.Module) -> list[str]:
    """The ``model.freeze`` prefixes that fix everything but the head (the last linear layer): each top-level
    module without the head, and the other parameters of the one that holds it (names as in the state dict)."""
    head = head_name(model)
    top = head.split(".")[0]
    prefixes: list[str] = []
    for name, _ in model.named_parameters():
        if name.startswith(head + "."):
            continue
        prefix = name.split(".")[0] if name.split(".")[0] != top else name
        if prefix not in prefixes:
            prefixes.append(prefix)
    return prefixes


# the shrinkage of the whitening's eigenvalues, as a fraction of their mean. In the pooled DP-SGD simulation of the
# head (bench/dp_head_sim.py; bench/RESULTS.md, stage 24) 0, 0.1 and 1 tied on validation, averaged over BreastMNIST
# and AdrenalMNIST3D (0.841, 0.841, 0.834). Of the two best, 0.1 blows up less the directions in which the synthetic
# images barely vary.
WHITEN_SHRINKAGE = 0.1


def whitening(features: torch.Tensor, *, shrinkage: float = WHITEN_SHRINKAGE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, transform)`` that whiten ``features`` ``(n, d)``: ``(f - mean) @ transform`` has (about) unit
    covariance. ZCA form, ``transform = V diag((lambda + shrinkage * mean(lambda))^-1/2) V^T`` from the
    eigendecomposition of the sample covariance: symmetric, so it keeps the features' own axes, and the
    shrinkage (a fraction of the mean eigenvalue added to every eigenvalue) keeps directions in which the
    synthetic images barely vary from being blown up when real images do vary there."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (n >= 2, d), got shape {tuple(features.shape)}")
    if shrinkage < 0:
        raise ValueError(f"shrinkage must be >= 0, got {shrinkage}")
    f = features.double()
    mean = f.mean(0)
    evals, evecs = torch.linalg.eigh(torch.cov(f.T).reshape(f.shape[1], f.shape[1]))
    evals = evals.clamp_min(0.0)
    scale = (evals + shrinkage * evals.mean()).clamp_min(1e-12).rsqrt()
    return mean.float(), ((evecs * scale) @ evecs.T).float()


def synthetic_batches(
    exp: ExperimentConfig, *, samples: int, generator: torch.Generator, batch_size: int = 256
) -> Iterator[torch.Tensor]:
    """``samples`` synthetic dead-leaves images in batches, augmented and in the data's intensities exactly as
    pretraining shows them (on the CPU): what :func:`synthetic_features` and the feature statistics' clipping
    bounds (:mod:`medflower.featurestats`) are read off, without reading any data."""
    spec = model_spec(exp)
    for start in range(0, samples, batch_size):
        n = min(batch_size, samples - start)
        x = dead_leaves(n, size=spec.img_size, channels=spec.in_channels, generator=generator)
        yield to_data_intensity(augment(x, generator), exp.data)


def synthetic_features(
    model: nn.Module, exp: ExperimentConfig, *, samples: int, generator: torch.Generator, batch_size: int = 256
) -> torch.Tensor:
    """The features ``model`` (its head set aside) gives ``samples`` synthetic dead-leaves images, augmented and
    in the data's intensities exactly as pretraining shows them: the statistics :func:`whitening` is fitted on."""
    device = next(model.parameters()).device
    out = []
    model.eval()
    with torch.no_grad():
        for x in synthetic_batches(exp, samples=samples, generator=generator, batch_size=batch_size):
            out.append(model(x.to(device)).flatten(1).cpu())
    return torch.cat(out)


def pretrain_prior(
    exp: ExperimentConfig,
    *,
    steps: int = 1500,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    textured: bool = False,
    init: dict[str, torch.Tensor] | None = None,
    whiten_samples: int = 2048,
    whiten_shrinkage: float = WHITEN_SHRINKAGE,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, torch.Tensor]:
    """The state dict of ``exp``'s network with its trunk pretrained on synthetic dead-leaves images.

    ``steps`` Adam steps on ``batch_size`` fresh images each (two SimCLR views of every image), on
    ``train.device`` (CUDA when present); ``seed`` fixes the initial weights and every image, so on one device
    the result is the same file each time. ``init``: start from this state dict's trunk (an earlier prior of
    the same network, with or without ``model.whiten_features``; its head is not used), so ``steps=0`` only
    adds what the experiment asks for now. With ``model.whiten_features`` the head's whitening is then fitted
    on the trunk's features of ``whiten_samples`` synthetic images (:func:`whitening`, ``whiten_shrinkage``).
    ``progress(step, loss)`` is called every 100 steps and at the end. The file fits ``model.init`` of any
    experiment with the same ``model`` and data shape.
    """
    if exp.task != "classification":
        raise ConfigError(f"medflower prior: task {exp.task!r}: the prior pretrains classification networks only")
    for name, value, least in (
        ("steps", steps, 0),
        ("batch_size", batch_size, 1),
        ("whiten_samples", whiten_samples, 2),
    ):
        if value < least:
            raise ValueError(f"{name} must be >= {least}, got {value}")
    if whiten_shrinkage < 0:  # checked before pretraining, not after it when the whitening is fitted
        raise ValueError(f"whiten_shrinkage must be >= 0, got {whiten_shrinkage}")
    if steps == 0 and init is None:
        raise ValueError("steps must be >= 1 without init: 0 steps from random weights is no prior")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    device = resolve_device(exp.train.device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)  # images drawn on the CPU: the same on every device
    # the network as the run builds it, but whole: the experiment's own model.freeze (the trunk, when it is
    # the experiment the prior is for) must not stop the trunk from pretraining
    model = build_experiment_model(replace(exp, model=replace(exp.model, freeze=())))
    spec = model_spec(exp)
    if init is not None:
        load_trunk(model, init)
    parent, attr = last_linear(model)
    head = getattr(parent, attr)
    setattr(parent, attr, nn.Identity())  # the trunk's features, flattened, while pretraining
    with torch.no_grad():
        width = model(torch.zeros((2, spec.in_channels, *spec.img_size))).flatten(1).shape[1]
    proj = nn.Sequential(nn.Linear(width, 128), nn.ReLU(), nn.Linear(128, 64))
    model.to(device).train()
    proj.to(device)
    opt = torch.optim.Adam([*model.parameters(), *proj.parameters()], lr=lr)
    for step in range(steps):
        x = dead_leaves(batch_size, size=spec.img_size, channels=spec.in_channels, generator=gen, textured=textured)
        v1, v2 = (to_data_intensity(augment(x, gen), exp.data).to(device) for _ in range(2))
        loss = nt_xent(proj(model(v1).flatten(1)), proj(model(v2).flatten(1)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress is not None and (step % 100 == 0 or step == steps - 1):
            progress(step, loss.item())
    if exp.model.whiten_features:  # parent is the WhitenedHead, still the identity map: raw features
        parent.mean, parent.transform = (
            t.to(device)
            for t in whitening(
                synthetic_features(model, exp, samples=whiten_samples, generator=gen), shrinkage=whiten_shrinkage
            )
        )
    setattr(parent, attr, head)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def load_trunk(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy every parameter and buffer of ``model`` outside its head from ``state`` (names as in the state dict;
    a head wrapped by ``model.whiten_features`` or not, the trunk's names are the same). A missing or
    mis-shaped trunk entry is a ConfigError naming it: a partial load would mix pretrained and random layers."""
    root = head_root(model)
    own = model.state_dict()
    trunk = {k: v for k, v in own.items() if not k.startswith(root + ".")}
    bad = [k for k, v in trunk.items() if k not in state or state[k].shape != v.shape]
    if bad:
        raise ConfigError(f"init: the state dict does not hold this model's trunk: missing or mis-shaped {bad[:5]}")
    model.load_state_dict({**own, **{k: state[k] for k in trunk}})


def head_root(model: nn.Module) -> str:
    """The head's name with its whitening, if any: the last linear layer, or the WhitenedHead around it."""
    name = head_name(model)
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    return parent if parent and isinstance(model.get_submodule(parent), WhitenedHead) else name


def print_progress(start: float) -> Callable[[int, float], None]:
    """A ``progress`` callback that prints the step, the loss and the seconds since ``start``."""

    def report(step: int, loss: float) -> None:
        print(f"step {step}: NT-Xent {loss:.3f} ({time.time() - start:.0f} s)", flush=True)

    return report
