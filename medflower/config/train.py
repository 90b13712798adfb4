"""``train:`` — rounds and the local training recipe every site follows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medflower.device import check_device_name
from medflower.schema import ConfigError, rng_field


@dataclass(frozen=True)
class TrainConfig:
    rounds: int = rng_field(5, min=1, max=10000)
    local_epochs: int = rng_field(1, min=1, max=1000)
    batch_size: int = rng_field(32, min=1, max=65536)
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = rng_field(1e-3, min=0.0, exclusive_min=True, max=10.0)
    momentum: float = rng_field(0.9, min=0.0, max=1.0)
    weight_decay: float = rng_field(0.0, min=0.0, max=1.0)
    # on-the-fly augmentation of training batches: random flips, and small shifts (client/augment.py)
    augment: Literal["none", "flip", "shift", "flip+shift"] = "none"
    # augmentation multiplicity (De et al. 2022): each training image is seen this many times per step,
    # differently augmented, and its gradients are averaged before DP-SGD clips them (client/train.py)
    augment_multiplicity: int = rng_field(1, min=1, max=64)
    eval_batch_size: int = rng_field(256, min=1)
    # threads each site's torch uses (simulation runs sites side by side on few cores)
    num_threads: int = rng_field(1, min=1, max=256)
    # where models train and evaluate: auto (CUDA when available, else CPU), cpu, cuda or cuda:N;
    # checked against the hardware where a model runs (medflower/device.py), not here
    device: str = "auto"
    # autocast precision: fp32, bf16 (native on recent GPUs and CPUs) or fp16 (CUDA only, with a grad
    # scaler); weights stay and are sent as float32 whatever the precision
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"

    def __post_init__(self) -> None:
        check_device_name(self.device)
        if self.augment_multiplicity > 1 and self.augment == "none":
            raise ConfigError(
                f"train.augment_multiplicity: {self.augment_multiplicity} copies of each image need an "
                "augmentation to differ; set train.augment (valid choices: 'flip', 'shift', 'flip+shift')"
            )
