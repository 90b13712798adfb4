"""Import torch up front, and MONAI completely, once, under a lock, when something first needs it.

Flower's simulation process loads the ServerApp (in a thread) and the ClientApp (in the main
thread) at the same time, and the two may later evaluate or build models concurrently. MONAI's
package ``__init__`` imports its submodules recursively, and two threads importing it concurrently
hit Python's import-deadlock avoidance, which hands one thread a partially initialised
``monai.apps`` (``ImportError: cannot import name 'download_and_extract'``). So every MONAI import
in medflower is preceded by :func:`require_monai`, whose lock serialises the one heavy import.

Why MONAI is not imported here at module load, as it once was: it costs about 4 s of CPU per
process (more with MLflow installed, which ``monai.handlers`` imports), which was most of the
``local`` engine's cost against a plain PyTorch loop on small 2D data sets (bench/RESULTS.md). A
classification run with the ``cnn`` never needs it: its network is torch only
(:mod:`medflower.smallcnn`) and its AUC is computed in torch (:mod:`medflower.metrics`).
"""

import threading

import torch  # noqa: F401

_LOCK = threading.Lock()


def require_monai() -> None:
    """Import the whole MONAI package once, serialised across threads (see the module docstring)."""
    with _LOCK:
        import monai  # noqa: F401
