"""Where a model runs and in what precision: ``train.device`` and ``train.precision``.

One small module used everywhere a model runs (site training and evaluation, the coordinator's
global evaluation, ``compare``'s pooled and local baselines, ``partition``'s identifiability
classifier), so that every place resolves ``auto`` the same way and fails with the same message.

Why the hardware is checked here and not when the YAML is loaded: the experiment YAML is read by
the coordinator and sent to every hospital, and a coordinator without a GPU may well run a
federation whose hospitals have one. :func:`resolve_device` is therefore called *where a model
will run*: by each site before it trains or evaluates (the error names the site), by
``medflower simulate`` / ``compare`` / ``partition`` before they start (one machine runs every
model), and by ``medflower site check --experiment`` on a hospital's machine. Loading the YAML
checks only the spelling (:func:`check_device_name`).

The coordinator's global evaluation uses ``train.device`` when this machine has it and falls back
to the CPU with a warning when it does not (:func:`resolve_device` with ``fallback=True``): its
evaluation must not stop a federation whose device setting was written for the hospitals.

Precision (torch's automatic mixed precision, ``torch.autocast``): ``bf16`` and ``fp16`` run the
forward pass in 16 bits while the weights stay float32, so what a site sends is always float32
(:func:`host_state`). ``fp16`` adds torch's ``GradScaler`` against underflow and needs CUDA:
on a CPU, float16 kernels are emulated and slower than float32, so it is refused rather than
silently run slower (use ``bf16``, which CPUs run natively). Evaluation on a CPU of an ``fp16``
experiment (only the coordinator's fallback reaches it) runs in float32.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import torch
from flwr.common.logger import log
from torch import nn

from medflower.schema import ConfigError

DEVICE_KEY = "train.device"
PRECISION_KEY = "train.precision"
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
PRECISIONS = ("fp32", "bf16", "fp16")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:[0-9]+)$")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_device_name(value: object, key: str = DEVICE_KEY) -> None:
    """The spelling of a device (no hardware is looked at); a wrong one lists the valid choices."""
    if not isinstance(value, str) or not _DEVICE_RE.match(value):
        raise ConfigError(
            f"{key}: invalid value {value!r}; valid choices are "
            + ", ".join(repr(c) for c in DEVICE_CHOICES)
            + " (N: a CUDA device index, e.g. 'cuda:1')"
        )


def cuda_devices() -> list[str]:
    """``cuda:0 (NVIDIA H200)``, ... for every CUDA device this process sees (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    return [f"cuda:{i} ({torch.cuda.get_device_name(i)})" for i in range(torch.cuda.device_count())]


def _no_cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build of torch"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    return f"torch {torch.__version__} was built with CUDA {torch.version.cuda} but finds no CUDA device{shown}"


def resolve_device(spec: str, *, where: str = "", key: str = DEVICE_KEY, fallback: bool = False) -> torch.device:
    """The torch device ``spec`` means on this machine (``auto``: CUDA when available, else CPU).

    ``where`` (e.g. ``site 'st-mary'``) prefixes the error. With ``fallback`` a CUDA device this
    machine lacks gives the CPU and a warning instead of an error (the coordinator: see the module doc).
    """
    check_device_name(spec, key)
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    prefix = f"{where}: " if where else ""
    index = int(spec.split(":", 1)[1]) if ":" in spec else 0
    if not torch.cuda.is_available():
        problem = f"{prefix}{key}: {spec!r}, but CUDA is not available on this machine: {_no_cuda_reason()}"
        if fallback:
            log(WARNING, "%s; running on the CPU instead", problem)
            return torch.device("cpu")
        raise ConfigError(f"{problem}. Use 'auto' (CUDA when present, else the CPU) or 'cpu'")
    count = torch.cuda.device_count()
    if index >= count:
        found = ", ".join(cuda_devices())
        problem = f"{prefix}{key}: {spec!r}, but this machine has {count} CUDA device(s): {found}"
        if fallback:
            log(WARNING, "%s; running on cuda:0 instead", problem)
            return torch.device("cuda", 0)
        raise ConfigError(f"{problem}. Use one of those, 'cuda' or 'auto'")
    return torch.device("cuda", index)


def describe(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H200)`` or ``cpu``: for logs and ``site check``."""
    if device.type == "cuda":
        index = device.index or 0  # resolve_device always gives an index
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


@dataclass(frozen=True)
class Amp:
    """The precision a model runs in on ``device``: an autocast context and, for fp16, a grad scaler."""

    device: torch.device
    precision: str = "fp32"

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (None: plain float32)."""
        return _DTYPES.get(self.precision)

    @property
    def uses_scaler(self) -> bool:
        return self.precision == "fp16"

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.dtype is None:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=self.dtype):
            yield

    def scaler(self) -> torch.amp.GradScaler | None:
        """A new ``GradScaler`` for fp16 (one per local training run), None otherwise."""
        return torch.amp.GradScaler(self.device.type) if self.uses_scaler else None

    @contextlib.contextmanager
    def training(self, model: nn.Module) -> Iterator[None]:
        """Train ``model`` in this precision: on a CPU in bf16, 3D convolutions torch gets wrong run in fp32.

        torch 2.13's oneDNN bf16 ``conv3d`` returns a wrong weight gradient when an input has a
        spatial extent of 2 (measured against float32: relative error 0.96, and NaN or inf in about
        3 % of steps, for every channel count from 1 to 64; extents 1 and 3-16 and all 2D
        convolutions are right to bf16's 0.3 %). The bottom of a 3D U-Net on a 16^3 or 32^3 volume,
        or of a CNN on 28^3, is such a layer. While ``model`` trains here, those layers leave
        autocast for their forward pass (so their backward pass too runs in float32); with oneDNN off
        bf16 would be right but 100x slower. Elsewhere (fp32, fp16/bf16 on CUDA) this does nothing.
        """
        if not (self.precision == "bf16" and self.device.type == "cpu"):
            yield
            return
        convs = [m for m in model.modules() if isinstance(m, nn.Conv3d) and any(k > 1 for k in m.kernel_size)]
        handles = [h for m in convs for h in _guard(m)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for m in convs:
                m.__dict__.pop("_medflower_autocast", None)


def _guard(conv: nn.Module) -> tuple[Any, Any]:
    return conv.register_forward_pre_hook(_float32_when_extent_2), conv.register_forward_hook(_restore_autocast)


def _float32_when_extent_2(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook of :meth:`Amp.training`: an input with a spatial extent of 2 runs in float32."""
    x = args[0]
    was = torch.is_autocast_enabled("cpu")
    module._medflower_autocast = was  # type: ignore[assignment]
    if not (was and isinstance(x, torch.Tensor) and 2 in x.shape[2:]):
        return None
    torch.set_autocast_enabled("cpu", False)
    return (x.float(), *args[1:])


def _restore_autocast(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
    torch.set_autocast_enabled("cpu", bool(getattr(module, "_medflower_autocast", True)))


def _check_precision(precision: str, key: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(
            f"{key}: invalid value {precision!r}; valid choices are " + ", ".join(repr(p) for p in PRECISIONS)
        )


def training_amp(device: torch.device, precision: str, *, where: str = "", key: str = PRECISION_KEY) -> Amp:
    """The precision for training on ``device``; fp16 off CUDA, or bf16 on a GPU without it, is an error."""
    _check_precision(precision, key)
    prefix = f"{where}: " if where else ""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"{prefix}{key}: 'fp16' needs a CUDA device, and this model runs on {device}: float16 is emulated "
            "on CPUs (slower than float32) and its grad scaler is for GPUs. Use 'bf16' (native on CPUs) or 'fp32'"
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"{prefix}{key}: 'bf16' is not supported by {describe(device)} (it needs an Ampere or newer GPU); "
            "use 'fp16' or 'fp32'"
        )
    return Amp(device, precision)


def resolve_amp(device: str, precision: str, *, where: str = "") -> Amp:
    """``train.device`` and ``train.precision`` on this machine, for training (errors prefixed by ``where``)."""
    return training_amp(resolve_device(device, where=where), precision, where=where)


def inference_amp(device: torch.device, precision: str) -> Amp:
    """The precision for evaluation: the training one where the device has it, else float32."""
    _check_precision(precision, PRECISION_KEY)
    if precision == "fp16" and device.type != "cuda":
        return Amp(device, "fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return Amp(device, "fp32")
    return Amp(device, precision)


def pin_memory(device: torch.device) -> bool:
    """Page-locked host batches copy to a GPU asynchronously; on a CPU they only cost memory."""
    return device.type == "cuda"


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` (asynchronous from pinned memory when the device is CUDA)."""
    return t.to(device, non_blocking=device.type == "cuda")


def host_state(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A state dict as CPU tensors with every floating tensor in float32: what a site sends.

    Autocast keeps the weights float32 already; this makes it hold whatever the model's device
    or dtype (integer buffers such as BatchNorm's ``num_batches_tracked`` keep their dtype).
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        t = v.detach().cpu()
        out[k] = t.float() if t.is_floating_point() else t
    return out
