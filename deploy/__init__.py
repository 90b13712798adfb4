"""Deploying medflower across hospitals: certificates, node keys, setup checks, a namespace lab.

Flower's Deployment Engine does the transport (SuperLink, SuperNodes, ``flwr run``); this package
only produces and checks what an administrator and a hospital must hand it. See deploy/README.md.
"""
