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
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from medflower.config import ExperimentConfig
from medflower.config.data import FILE_KINDS, DataConfig
from medflower.device import resolve_device
from medflower.modelspec import build_experiment_model, model_spec
from medflower.schema import ConfigError

__all__ = [
    "augment",
    "dead_leaves",
    "last_linear",
    "nt_xent",
    "pretrain_prior",
    "to_data_intensity",
    "trunk_prefixes",
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


def _head_name(model: nn.Module) -> str:
    """The qualified name of the model's last ``nn.Linear``: the classifier head."""
    found = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ConfigError("model: no nn.Linear head to set aside: the prior pretrains classification networks only")
    return found[-1]


def last_linear(model: nn.Module) -> tuple[nn.Module, str]:
    """The classifier head: the parent and attribute name of the model's last ``nn.Linear``."""
    path = _head_name(model).split(".")
    parent = model.get_submodule(".".join(path[:-1])) if len(path) > 1 else model
    return parent, path[-1]


def trunk_prefixes(model: nn.Module) -> list[str]:
    """The ``model.freeze`` prefixes that fix everything but the head (the last linear layer): each top-level
    module without the head, and the other parameters of the one that holds it (names as in the state dict)."""
    head = _head_name(model)
    top = head.split(".")[0]
    prefixes: list[str] = []
    for name, _ in model.named_parameters():
        if name.startswith(head + "."):
            continue
        prefix = name.split(".")[0] if name.split(".")[0] != top else name
        if prefix not in prefixes:
            prefixes.append(prefix)
    return prefixes


def pretrain_prior(
    exp: ExperimentConfig,
    *,
    steps: int = 1500,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    textured: bool = False,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, torch.Tensor]:
    """The state dict of ``exp``'s network with its trunk pretrained on synthetic dead-leaves images.

    ``steps`` Adam steps on ``batch_size`` fresh images each (two SimCLR views of every image), on
    ``train.device`` (CUDA when present); ``seed`` fixes the initial weights and every image, so on one device
    the result is the same file each time. ``progress(step, loss)`` is called every 100 steps and at the end.
    The file fits ``model.init`` of any experiment with the same ``model`` and data shape.
    """
    if exp.task != "classification":
        raise ConfigError(f"medflower prior: task {exp.task!r}: the prior pretrains classification networks only")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    device = resolve_device(exp.train.device)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)  # images drawn on the CPU: the same on every device
    # the network as the run builds it, but whole: the experiment's own model.freeze (the trunk, when it is
    # the experiment the prior is for) must not stop the trunk from pretraining
    model = build_experiment_model(replace(exp, model=replace(exp.model, freeze=())))
    spec = model_spec(exp)
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
    setattr(parent, attr, head)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def print_progress(start: float) -> Callable[[int, float], None]:
    """A ``progress`` callback that prints the step, the loss and the seconds since ``start``."""

    def report(step: int, loss: float) -> None:
        print(f"step {step}: NT-Xent {loss:.3f} ({time.time() - start:.0f} s)", flush=True)

    return report
