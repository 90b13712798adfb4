"""The ClientApp component of ``flwr run .`` (pyproject ``[tool.flwr.app.components] clientapp``,
through the bundle's top-level ``flwr_components`` module: see its docstring).

One app bundle serves two kinds of node, told apart by their node config:

* a hospital's SuperNode (``site-config``: its site YAML) runs the hospital ClientApp,
  :data:`medflower.client.app.app`, which never imports simulation code;
* a simulated node (``partition-id``: Flower's simulation engine under ``flwr run . local``, or a
  rehearsal node started with ``--node-config "partition-id=..."``) runs the simulation's ClientApp,
  :data:`medflower.simulation.clientapp.app`.

A node with neither gets the hospital app, whose error says how to start the SuperNode.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from medflower import keys
from medflower.client.app import app as hospital_app


def is_simulated(context: Context) -> bool:
    """A simulated site (``partition-id``, no ``site-config``) rather than a hospital's node."""
    nc = context.node_config
    return keys.NODE_PARTITION_ID in nc and not str(nc.get(keys.NODE_SITE_CONFIG, "") or "")


def app_for(context: Context) -> ClientApp:
    """The ClientApp this node runs (see the module doc)."""
    if not is_simulated(context):
        return hospital_app
    # imported here, on a simulated node only: a hospital node never loads simulation code
    from medflower.simulation.clientapp import app as simulation_app

    return simulation_app


clientapp = ClientApp()


@clientapp.train()
def _train(msg: Message, context: Context) -> Message:
    return app_for(context)(msg, context)


@clientapp.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return app_for(context)(msg, context)
