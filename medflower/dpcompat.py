"""Make a zoo network trainable with sample-level DP-SGD (Opacus), identically on both sides.

Both the coordinator and every site call this from :func:`medflower.modelspec.build_experiment_model`
when ``privacy.mode`` is ``sample``, so the architecture they exchange weights for is the same.

1. Opacus' :class:`~opacus.validators.ModuleValidator` lists layers DP-SGD cannot handle and
   replaces BatchNorm (which mixes the samples of a batch, so no per-sample gradient exists) by
   GroupNorm. The replacement is announced, never silent.
2. In-place activations are switched to out-of-place (same function, no parameters): Opacus'
   backward hooks cannot see through tensors modified in place.
3. A probe (not in Opacus) runs one forward/backward pass of a two-image batch through Opacus'
   ``GradSampleModule`` and checks that every trainable parameter received a per-sample gradient.
   The validator alone misses networks that break Opacus' hooks (MONAI's ViT as shipped: see
   :mod:`medflower.dpvit`); the probe turns them into a clear error before any training.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Sequence
from logging import WARNING

import torch
from flwr.common.logger import log
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from medflower.config import ModelConfig
from medflower.schema import ConfigError, to_json
from medflower.tasks import logits_of

_ANNOUNCED: set[str] = set()
_PROBED: dict[str, str | None] = {}  # model config + sizes -> error text (None = fine)


def _unsupported(cfg: ModelConfig, why: str) -> ConfigError:
    return ConfigError(
        f"model.name: {cfg.name!r} cannot be trained with privacy.mode 'sample' (Opacus DP-SGD): {why}. "
        "Choose another model (cnn, vit, unet and basicunet are known to work) or set privacy.mode to "
        "'client' or 'none'"
    )


def probe_per_sample_gradients(model: nn.Module, *, in_channels: int, img_size: Sequence[int]) -> str | None:
    """Why Opacus cannot give ``model`` per-sample gradients, or None if it can (model untouched)."""
    probe = copy.deepcopy(model).train()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gsm = GradSampleModule(probe)
            x = torch.randn(2, in_channels, *img_size, generator=torch.Generator().manual_seed(0))
            logits_of(gsm(x)).float().square().mean().backward()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    missing = [n for n, p in probe.named_parameters() if p.requires_grad and not _has_grad_sample(p, batch=2)]
    if missing:
        return (
            "no per-sample gradient for parameter(s) "
            + ", ".join(missing[:4])
            + (f" (+{len(missing) - 4} more)" if len(missing) > 4 else "")
            + " (unused or hidden from Opacus' hooks)"
        )
    return None


def _has_grad_sample(p: nn.Parameter, *, batch: int) -> bool:
    """Whether Opacus' hooks left ``p.grad_sample`` (an attribute Opacus adds) with one row per sample."""
    grad_sample = getattr(p, "grad_sample", None)
    return isinstance(grad_sample, torch.Tensor) and grad_sample.shape[0] == batch


def make_dp_compatible(model: nn.Module, cfg: ModelConfig, *, in_channels: int, img_size: Sequence[int]) -> nn.Module:
    """``model`` if Opacus can train it, else its ModuleValidator-fixed copy; ConfigError if neither."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        errors = ModuleValidator.validate(model, strict=False)
        fixed = ModuleValidator.fix(model) if errors else model
        remaining = ModuleValidator.validate(fixed, strict=False) if errors else []
    for m in fixed.modules():  # in-place activations (ReLU(inplace=True)) break Opacus' backward hooks
        if getattr(m, "inplace", False) is True:
            m.inplace = False
    if remaining:
        raise _unsupported(cfg, "; ".join(str(e) for e in remaining[:5]))
    key = json.dumps([to_json(cfg), in_channels, list(img_size)])
    if key not in _PROBED:  # both apps build the model every round: probe once per process
        _PROBED[key] = probe_per_sample_gradients(fixed, in_channels=in_channels, img_size=img_size)
    if _PROBED[key] is not None:
        raise _unsupported(cfg, str(_PROBED[key]))
    if errors and cfg.name not in _ANNOUNCED:
        _ANNOUNCED.add(cfg.name)
        n_bn = sum(1 for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
        log(
            WARNING,
            "privacy.mode 'sample': model %r has %d BatchNorm layer(s), which DP-SGD cannot use "
            "(they mix the samples of a batch); Opacus' ModuleValidator replaced them by GroupNorm on the "
            "coordinator and on every site. Set model.norm: group to choose this yourself.",
            cfg.name,
            n_bn,
        )
    return fixed
