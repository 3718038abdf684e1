"""
Django cache backend for ElastiCache memcached clusters, driving pylibmc.

``ElastiCache`` is Django's ``PyLibMCCache`` with one difference: the servers are not the
LOCATION but the nodes the LOCATION's configuration endpoint lists, found and followed by
``topology``. Every cache method is Django's own.
"""

from __future__ import annotations

import os
from typing import Any

from django.core.cache.backends.memcached import PyLibMCCache

from .cluster_utils import ClusterConfig
from .options import parse_location, split_options
from .topology import topology_for

__all__ = ["DEFAULT_BEHAVIORS", "ElastiCache"]

DEFAULT_BEHAVIORS: dict[str, Any] = {
    # Consistent hashing: a node added or removed moves only its share of the keys.
    "ketama": True,
    "tcp_nodelay": True,
    # libmemcached waits 4 s to connect and 5 s for a reply by default; a cache that is
    # slower than a second is worse than no cache for a web request.
    "connect_timeout": 1000,
    "_poll_timeout": 1000,
    # After two failures in a row a node is marked failed: calls for its keys then fail at
    # once instead of waiting on it, and it is tried again after retry_timeout seconds.
    # (libmemcached's remove_failed does not move those keys elsewhere and slows recovery.)
    "failure_limit": 2,
    "retry_timeout": 2,
}
"""pylibmc behaviours used unless OPTIONS['behaviors'] overrides them key by key."""

_clients_inherited_across_fork: list[Any] = []


class ElastiCache(PyLibMCCache):
    """
    ``PyLibMCCache`` over every node of an ElastiCache cluster.

    LOCATION is the cluster's configuration endpoint. Upper-case OPTIONS configure this
    backend (see ``options.BackendOptions``); all others go to ``pylibmc.Client`` exactly as
    with Django's own backend, with ``behaviors`` merged over ``DEFAULT_BEHAVIORS``.
    """

    def __init__(self, server: str, params: dict[str, Any]) -> None:
        endpoint = parse_location(server)
        backend_options, client_options = split_options(params.get("OPTIONS"))
        super().__init__(server, {**params, "OPTIONS": client_options})
        self._options = {
            **client_options,
            "behaviors": {**DEFAULT_BEHAVIORS, **(client_options.get("behaviors") or {})},
        }
        self._topology = topology_for(endpoint, backend_options)
        self._client: Any = None
        self._client_config: ClusterConfig | None = None
        self._client_pid = 0

    @property
    def client_servers(self) -> list[str]:
        return list(self._topology.current().addresses)

    @property
    def _cache(self) -> Any:
        """
        The pylibmc client for the current node list. pylibmc cannot change the servers of
        a live client, so a new list means a new client; checking costs one identity test.
        """
        config = self._topology.current()
        if config is not self._client_config:
            self._replace_client(config)
        return self._client

    def _replace_client(self, config: ClusterConfig) -> None:
        old_client, old_pid = self._client, self._client_pid
        self._client = self._class(list(config.addresses), **self._options)
        self._client_config = config
        self._client_pid = os.getpid()
        if old_client is None:
            return
        if old_pid == self._client_pid:
            old_client.disconnect_all()
        else:
            # Freeing a client sends "quit" on its sockets, which after a fork are the
            # parent's too; keeping the object alive leaves the parent's connections intact.
            _clients_inherited_across_fork.append(old_client)
