"""Data sets as in-memory arrays with train/val/test splits.

Both apps need this: the server evaluates the global model on a held-out test split and the
simulated sites read their partitions of the same splits. Loaders return :class:`DatasetSplits`;
images are ``float32`` ``(N, C, *spatial)``, labels ``int64`` ``(N,)`` for classification or
``(N, 1, *spatial)`` label maps for segmentation. Spatial axes follow one convention for every file
format (:mod:`medflower.data.readers`): rows x columns in 2D, rows x columns x slices in 3D.
"""

from __future__ import annotations

from medflower.data.base import ArraySplit, DataError, DatasetSplits, SiteData
from medflower.data.registry import load_dataset

__all__ = ["ArraySplit", "DataError", "DatasetSplits", "SiteData", "load_dataset"]
