"""Import torch and MONAI completely, once, before any app module touches them.

Flower's simulation process loads the ServerApp (in a thread) and the ClientApp (in the main
thread) at the same time. MONAI's package ``__init__`` imports its submodules recursively, and two
threads importing it concurrently hit Python's import-deadlock avoidance, which hands one thread a
partially initialised ``monai.apps`` (``ImportError: cannot import name 'download_and_extract'``).
Both app modules import this module first: its module lock serialises the heavy imports.
"""

import monai  # noqa: F401
import torch  # noqa: F401
