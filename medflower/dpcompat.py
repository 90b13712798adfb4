"""Make a zoo network trainable with sample-level DP-SGD (Opacus), identically on both sides.

Both the coordinator and every site call this from :func:`medflower.modelspec.build_experiment_model`
when ``privacy.mode`` is ``sample``, so the architecture they exchange weights for is the same.
Opacus' :class:`~opacus.validators.ModuleValidator` does the work: it lists layers DP-SGD cannot
handle and replaces BatchNorm (which mixes the samples of a batch, so no per-sample gradient
exists) by GroupNorm. The replacement is announced, never silent.
"""

from __future__ import annotations

import warnings
from logging import WARNING

from flwr.common.logger import log
from torch import nn

from medflower.config import ModelConfig
from medflower.schema import ConfigError


def make_dp_compatible(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """``model`` if Opacus can train it, else its ModuleValidator-fixed copy; ConfigError if neither."""
    from opacus.validators import ModuleValidator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        errors = ModuleValidator.validate(model, strict=False)
        if not errors:
            return model
        fixed = ModuleValidator.fix(model)
        remaining = ModuleValidator.validate(fixed, strict=False)
    if remaining:
        raise ConfigError(
            f"model.name: {cfg.name!r} cannot be trained with privacy.mode 'sample' (Opacus DP-SGD): "
            + "; ".join(str(e) for e in remaining[:5])
            + ". Choose another model or set privacy.mode to 'client' or 'none'"
        )
    n_bn = sum(1 for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    log(WARNING, "privacy.mode 'sample': model %r has %d BatchNorm layer(s), which DP-SGD cannot use "
        "(they mix the samples of a batch); Opacus' ModuleValidator replaced them by GroupNorm on the "
        "coordinator and on every site. Set model.norm: group to choose this yourself.", cfg.name, n_bn)
    return fixed
