"""Deploying medflower across hospitals: certificates, node keys, the reverse proxies in front of
Flower, site registration, setup checks, a namespace lab.

Flower's Deployment Engine does the transport (SuperLink, SuperNodes, ``flwr run``); this package
produces and checks what an administrator and a hospital must hand it, and keeps hospitals to the
Fleet API (``medflower.deploy.proxy``). See deploy/README.md.
"""
