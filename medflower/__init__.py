"""medflower's shared package: what the coordinator and the hospitals must agree on.

Model zoo (:mod:`medflower.models`), task metrics (:mod:`medflower.metrics`), the experiment config
schema (:mod:`medflower.config`), message keys (:mod:`medflower.keys`) and data loaders
(:mod:`medflower.data`). ``server`` and ``client`` import this, never each other.
"""

__version__ = "0.1.0"
