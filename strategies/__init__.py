"""Aggregation methods: the registry (:mod:`medflower.strategies.registry`), one module per method
(:mod:`medflower.strategies.methods`), the coordinator's half of client-level DP
(:mod:`medflower.strategies.privacy`) and saving a strategy's state (:mod:`medflower.strategies.state`).

Flower's strategies are used as they are; what Flower lacks (SCAFFOLD, FedBN, Ditto, every site
half) is written in the method's own module. Kept import-light: :mod:`medflower.config` imports
the registry to validate ``strategy:``.
"""
