"""``privacy:`` — differential privacy policy (see :mod:`client.privacy`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class PrivacyConfig:
    mode: Literal["none", "sample", "client"] = "none"
