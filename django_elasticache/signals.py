"""
Django signals for what the topology does in the background.

A refresh runs in a thread of its own, so nothing a request does notices when the node list
changes or the endpoint stops answering; these signals let a project react (a metric, an
alert, a cache warm-up) without reading the log. Both are sent from the refresh thread:
receivers must be quick and must not use the cache whose topology sent them. A receiver
that raises is logged and does not stop the refresh or the other receivers.

``node_list_changed(sender, endpoint, old, new)``
    A refresh applied a new node list. ``endpoint`` is the configuration endpoint as
    ``host:port``; ``old`` and ``new`` are ``cluster_utils.ClusterConfig`` objects (each has
    ``version`` and ``nodes``). Not sent for the first discovery of the process.

``refresh_failed(sender, endpoint, error)``
    A background refresh did not get a node list; the last good one stays in use.
    ``error`` is the exception, usually a ``cluster_utils.ClusterDiscoveryError``.

``sender`` is ``topology.ClusterTopology``.
"""

from __future__ import annotations

import logging
from typing import Any

from django.dispatch import Signal

__all__ = ["node_list_changed", "refresh_failed", "send"]

logger = logging.getLogger("django_elasticache")

node_list_changed = Signal()
refresh_failed = Signal()


def send(signal: Signal, sender: type, **named: Any) -> None:
    """
    Send ``signal`` to every receiver even if one raises: a refresh thread must survive
    whatever a project's receiver does.
    """
    for receiver, outcome in signal.send_robust(sender, **named):
        if isinstance(outcome, Exception):
            logger.error("Signal receiver %r raised %r", receiver, outcome, exc_info=outcome)
