"""
Django cache backend for ElastiCache memcached clusters, driving pylibmc.

``ElastiCache`` is Django's ``PyLibMCCache`` with one difference: the servers are not the
LOCATION but the nodes the LOCATION's configuration endpoint lists, found and followed by
``topology``. Every cache method is Django's own, guarded by ``backend.ClusterCacheMixin``;
each call runs on a pooled single-node pylibmc client of the node that holds its key.

Keys are placed by libmemcached's own consistent hashing (ketama) over the nodes' hostnames,
as AWS's ElastiCache cluster client places them: when ElastiCache replaces a node it keeps its
hostname and port and gets a new IP, so a ring keyed by IP would move keys between the nodes
that did not change.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

import pylibmc
from django.core.cache.backends.base import InvalidCacheBackendError
from django.core.cache.backends.memcached import PyLibMCCache

from .aio_protocol import (
    ClientErrorReply,
    IllegalKey,
    ProtocolError,
    ServerErrorReply,
)
from .async_backend import AsyncCacheMixin
from .backend import ClusterCacheMixin
from .cluster_utils import ClusterConfig, ClusterDiscoveryError, ClusterNode, format_address
from .pool import NodeUnavailable

__all__ = ["DEFAULT_BEHAVIORS", "ElastiCache", "LibmemcachedPlacement", "PylibmcAdapter"]

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

_FAILED_HOST = re.compile(r"host: (\S+?)(?: ->|$)")


def node_name(node: ClusterNode) -> str:
    """What a node is known by for placement: its hostname and port, the IP only if unnamed."""
    return format_address(node.hostname or node.ip, node.port)


class LibmemcachedPlacement:
    """
    The node libmemcached would pick for a key, given the node hostnames as its servers.

    A pylibmc client built over the names and never connected computes it in C: libmemcached
    builds its ketama continuum from the server strings when they are added, and ``hash``
    looks a key up in it (about 0.2 us) without touching the network or the client's state.
    The behaviours that choose the hashing (``ketama``, ``hash``, ``distribution``...) are the
    backend's, so placement follows them.
    """

    def __init__(self, config: ClusterConfig, behaviors: dict[str, Any]) -> None:
        names = [node_name(node) for node in config.nodes]
        self.node_index = pylibmc.Client(names, behaviors=behaviors).hash


_ZLIB_FLAG = 1 << 3
"""pylibmc's flag for a value it compressed (on ``set`` with ``min_compress_len``)."""


class PylibmcAdapter:
    """
    pylibmc's rules for the event-loop path: values are (de)serialized by a pylibmc client's
    own ``serialize``/``deserialize`` (flags included), timeouts are the behaviours
    ``connect_timeout`` and ``_poll_timeout`` (ms), and failures become the pylibmc
    exceptions the sync path raises for them.
    """

    def __init__(self, options: dict[str, Any]) -> None:
        behaviors = options["behaviors"]
        if behaviors.get("_noreply"):
            raise InvalidCacheBackendError(
                "The async cache methods wait for every reply; behaviour _noreply=True "
                "is only supported by the sync methods"
            )
        # Never connected: only its codec is used.
        self._codec = pylibmc.Client(["localhost"], **options)
        self.connect_timeout = behaviors["connect_timeout"] / 1000
        self.timeout = behaviors["_poll_timeout"] / 1000

    def encode_key(self, key: str) -> bytes:
        return key.encode()

    def serialize(self, key: bytes, value: Any) -> tuple[bytes, int]:
        return self._codec.serialize(value)

    def deserialize(self, key: bytes, data: bytes, flags: int) -> Any:
        if flags & _ZLIB_FLAG:
            data, flags = zlib.decompress(data), flags & ~_ZLIB_FLAG
        return self._codec.deserialize(data, flags)

    def library_error(self, error: Exception, node_name: str) -> Exception:
        # The node last, as libmemcached words it, for the error log's per-node limit.
        message = f"{error}, host: {node_name}" if node_name else str(error)
        if isinstance(error, ServerErrorReply):
            too_big = "too large" in str(error)
            return (pylibmc.TooBig if too_big else pylibmc.ServerError)(message)
        if isinstance(error, ClientErrorReply):
            return pylibmc.ClientError(message)
        if isinstance(error, IllegalKey):
            return pylibmc.BadKeyProvided(message)
        if isinstance(error, ProtocolError):
            return pylibmc.ProtocolError(message)
        if isinstance(error, TimeoutError):
            return pylibmc.Error(f"A TIMEOUT OCCURRED, {message}")
        return pylibmc.ConnectionError(message)


class ElastiCache(AsyncCacheMixin, ClusterCacheMixin, PyLibMCCache):
    """
    ``PyLibMCCache`` over every node of an ElastiCache cluster.

    LOCATION is the cluster's configuration endpoint. Upper-case OPTIONS configure this
    backend (see ``options.BackendOptions``); all others go to ``pylibmc.Client`` exactly as
    with Django's own backend, with ``behaviors`` merged over ``DEFAULT_BEHAVIORS``.
    """

    server_errors = (pylibmc.Error, ClusterDiscoveryError, NodeUnavailable)
    caller_errors = (pylibmc.TooBig, pylibmc.BadKeyProvided, pylibmc.NotFound)
    connection_errors = (
        pylibmc.ConnectionError,
        pylibmc.ConnectionBindError,
        pylibmc.HostLookupError,
        pylibmc.ServerDead,
        pylibmc.ServerDown,
        pylibmc.SocketCreateError,
        pylibmc.ReadError,
        pylibmc.WriteError,
        pylibmc.UnknownReadFailure,
    )

    def __init__(self, server: str, params: dict[str, Any]) -> None:
        super().__init__(server, params)
        if self.backend_options.tls is not None:
            raise InvalidCacheBackendError(
                "pylibmc cannot speak TLS; for a cluster with in-transit encryption use "
                "BACKEND 'django_elasticache.pymemcache.ElastiCache'"
            )
        self._options = {
            **self._options,
            "behaviors": {**DEFAULT_BEHAVIORS, **(self._options.get("behaviors") or {})},
        }

    def _make_node_client(self, node: ClusterNode) -> pylibmc.Client:
        return self._class([node.address], **self._options)

    def _close_node_client(self, client: pylibmc.Client) -> None:
        client.disconnect_all()

    def _make_async_adapter(self) -> PylibmcAdapter:
        return PylibmcAdapter(self._options)

    def _placement(self, config: ClusterConfig) -> LibmemcachedPlacement:
        return LibmemcachedPlacement(config, self._options["behaviors"])

    def _error_source(self, error: Exception) -> str:
        """libmemcached names the failing node at the end of its message."""
        match = _FAILED_HOST.search(str(error))
        return match[1] if match else super()._error_source(error)
