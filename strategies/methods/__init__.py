"""One module per aggregation method, each declaring ``METHOD`` (see :mod:`medflower.strategies.registry`)."""
