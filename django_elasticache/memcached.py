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

import functools
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pylibmc
from django.core.cache.backends.base import InvalidCacheBackendError
from django.core.cache.backends.memcached import PyLibMCCache

from . import pipeline
from .async_backend import AsyncCacheMixin
from .backend import ClusterCacheMixin
from .cluster_utils import (
    ClusterConfig,
    ClusterDiscoveryError,
    ClusterNode,
    format_address,
)
from .compression import compressed, decompressed
from .options import BackendRules
from .pool import NodeError
from .protocol import (
    VALUE_TOO_LARGE,
    ClientErrorReply,
    ErrorReply,
    IllegalKey,
    Parser,
    ProtocolError,
    ServerErrorReply,
    counter_request,
    delete_request,
    parse_counter,
    parse_deleted,
    parse_stored,
    parse_values,
    retrieval_request,
    storage_request,
)

__all__ = [
    "DEFAULT_BEHAVIORS",
    "OPTION_RULES",
    "ElastiCache",
    "LibmemcachedPlacement",
    "PipelinedClient",
    "PylibmcAdapter",
]

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

MAX_KEY_BYTES = 250
"""memcached's key length limit, in bytes."""

LIBMEMCACHED_MAX_DELTA = 2**31 - 1
"""The largest ``incr``/``decr`` delta pylibmc hands libmemcached (a C int)."""

MEMCACHED_DELTA_LIMIT = 2**64
"""memcached's deltas are unsigned 64-bit: this one and larger get ``CLIENT_ERROR``."""

OPTION_RULES = BackendRules(
    library="pylibmc", speaks_tls=False, reply_dropping_options=(("behaviors", "_noreply"),)
)
"""What this backend refuses besides the shared rules: TLS, so serverless caches too."""

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


def _seconds(milliseconds: int, default: float) -> float:
    """A libmemcached timeout behaviour in seconds; not positive means libmemcached's default."""
    return milliseconds / 1000 if milliseconds > 0 else default


class PipelinedClient(pylibmc.Client):
    """
    A pylibmc client of one node whose ``set_multi`` and ``delete_multi`` are pipelined (see
    ``pipeline``), and whose ``get_multi`` can be sent before its reply is read
    (``start_get_multi``, so that a multi-node ``get_many`` waits for one round trip, not one
    per node), on a connection of its own, opened on first use with the client's timeouts.

    Every key's outcome is read back: a refused key is returned as failed, and a value over
    the node's item size limit raises ``pylibmc.TooBig`` as libmemcached's ``set_multi`` does,
    but only after every other key was stored (the node drops the too large key's old value).
    With the binary protocol, SASL or any of pylibmc's extra arguments, libmemcached does the
    work.

    ``min_compress_len`` is pylibmc's argument of that name, given to every ``set``, ``add``
    and ``set_multi``: Django never passes it. The pipelined ``set_multi`` compresses as
    pylibmc does (``compression.compressed``).

    After any ``Exception`` the client is in step with the node, so the pool takes it back
    (see ``pool``): libmemcached keeps its own connection's state, and a Python exception
    (a signal handler's) can only land before or after one of its calls, never inside; and
    an exception of any class raised while this client's own socket is sending or reading
    closes that socket, so no reply is ever left on it for the next call to read.

    ``incr`` and ``decr`` take memcached's whole range of deltas, 0 to 2**64 - 1: pylibmc
    passes the delta to libmemcached as a 32-bit int, so a larger one goes over the
    client's own socket (text protocol only).
    """

    def __init__(self, node: ClusterNode, min_compress_len: int = 0, **options: Any) -> None:
        super().__init__([node.address], **options)
        self._min_compress_len = min_compress_len
        self._host = node.ip or node.hostname
        self._port = node.port
        self._node_name = f"{self._host}:{self._port}"
        self._pipelines = not options.get("binary") and options.get("username") is None
        self._sock: socket.socket | None = None

    def set(self, key: Any, value: Any, time: int = 0, **extra: Any) -> bool:
        return super().set(key, value, time, **self._compressing(extra))

    def add(self, key: Any, value: Any, time: int = 0, **extra: Any) -> bool:
        return super().add(key, value, time, **self._compressing(extra))

    def incr(self, key: Any, delta: int = 1) -> int:
        return self._count(b"incr", key, delta)

    def decr(self, key: Any, delta: int = 1) -> int:
        return self._count(b"decr", key, delta)

    def _count(self, command: bytes, key: Any, delta: int) -> int:
        """``incr``/``decr`` by libmemcached, or over the own socket for a delta it cannot take."""
        encoded = self._encoded([key], {}) if delta > LIBMEMCACHED_MAX_DELTA else None
        if encoded is None:
            return (super().incr if command == b"incr" else super().decr)(key, delta)
        if delta >= MEMCACHED_DELTA_LIMIT:
            raise pylibmc.ClientError(
                f"invalid numeric delta argument {delta}: memcached takes 0 <= delta < 2**64, "
                f"host: {self._host}:{self._port}"
            )
        request = counter_request(command, encoded[0], delta)
        (value,) = self._exchange([request], parse_counter, repeatable=False)
        if isinstance(value, ErrorReply):
            raise pylibmc_error(value, self._node_name)
        if value is None:
            raise pylibmc.NotFound(f"NOT FOUND, host: {self._host}:{self._port}")
        return value

    def set_multi(self, mapping: Mapping[Any, Any], time: int = 0, **extra: Any) -> list[Any]:
        keys = list(mapping)
        encoded = self._encoded(keys, extra)
        if encoded is None:
            return super().set_multi(mapping, time, **self._compressing(extra))
        serialize, min_length = self.serialize, self._min_compress_len
        requests = []
        for key, key_bytes in zip(keys, encoded, strict=True):
            data, flags = serialize(mapping[key])
            data, flags = compressed(data, flags, min_length)
            requests.append(storage_request(b"set", key_bytes, flags, time, data))
        replies = self._exchange(requests, parse_stored)
        too_large = [
            key
            for key, reply in zip(keys, replies, strict=True)
            if isinstance(reply, ServerErrorReply) and VALUE_TOO_LARGE in str(reply)
        ]
        if too_large:
            raise pylibmc.TooBig(f"values larger than the node's item size limit: {too_large!r}")
        return [key for key, reply in zip(keys, replies, strict=True) if reply is not True]

    def delete_multi(self, keys: Iterable[Any], **extra: Any) -> bool:
        keys = list(keys)
        encoded = self._encoded(keys, extra)
        if encoded is None:
            return super().delete_multi(keys, **extra)
        replies = self._exchange([delete_request(key) for key in encoded], parse_deleted)
        return all(reply is True for reply in replies)

    def start_get_multi(self, keys: list[Any]) -> Callable[[], dict[Any, Any]]:
        """
        ``get_multi(keys)`` in two steps: the request is sent now, and the returned function
        reads the reply, so the caller can send to other nodes in between. Its errors are
        those of the pipelined calls, raised by the returned function.
        """
        encoded = self._encoded(keys, {})
        if encoded is None:
            return functools.partial(super().get_multi, keys)
        originals = dict(zip(encoded, keys, strict=True))
        request = [retrieval_request(encoded)]
        sent_on_reused: bool | None = self._sock is not None
        failure: OSError | None = None
        try:
            self._connection().sendall(request[0])
        except OSError as error:
            self._close_pipeline()
            failure = None if sent_on_reused and _closed_by_node(error) else error
            sent_on_reused = None  # Not sent: reading the reply sends it again.
        except BaseException:
            self._close_pipeline()  # Perhaps sent in part: its reply must never be read.
            raise

        def read_reply() -> dict[Any, Any]:
            if failure is not None:
                raise self._connection_error(failure) from failure
            (found,) = self._exchange(request, parse_values, sent_on_reused)
            if isinstance(found, ErrorReply):
                raise pylibmc_error(found, self._node_name)
            deserialize = self.deserialize
            try:
                return {
                    originals[key]: deserialize(*decompressed(data, flags))
                    for key, (flags, data) in found.items()
                }
            except KeyError:
                out_of_step = pipeline.key_not_asked_for(found, originals)
                if out_of_step is None:
                    raise
                self._close_pipeline()
                raise pylibmc_error(out_of_step, self._node_name) from None

        return read_reply

    def disconnect_all(self) -> None:
        super().disconnect_all()
        self._close_pipeline()

    def _compressing(self, extra: dict[str, Any]) -> dict[str, Any]:
        """pylibmc's extra arguments, with the client's ``min_compress_len`` unless given."""
        return {"min_compress_len": self._min_compress_len, **extra}

    def _encoded(self, keys: list[Any], extra: dict[str, Any]) -> list[bytes] | None:
        """The keys as sent, or None when libmemcached must do the call."""
        if extra or not self._pipelines:
            return None
        encoded = [key.encode() if type(key) is str else key for key in keys]
        if any(type(key) is not bytes or len(key) > MAX_KEY_BYTES for key in encoded):
            return None  # libmemcached reports such keys its own way.
        return encoded

    def _exchange(
        self,
        requests: list[bytes],
        parse: Parser,
        sent_on_reused: bool | None = None,
        repeatable: bool = True,
    ) -> list[Any]:
        """
        Run the requests, or with ``sent_on_reused`` set, read the replies to the requests
        already sent (on a pooled connection if True). A pooled connection the node closed
        since (an idle connection it dropped) is replaced once if the requests are
        ``repeatable`` (an ``incr`` is not: the node may have run it). A timeout is not
        retried: the node is silent, and the call fails after one timeout, not two.
        Connection errors are pylibmc's, naming the node as libmemcached does; a reply that
        is not memcached's closes the connection and raises ``pylibmc.ProtocolError``; any
        exception closes the connection.
        """
        reused = self._sock is not None if sent_on_reused is None else sent_on_reused
        reused = reused and repeatable
        while True:
            try:
                if sent_on_reused is not None and self._sock is not None:
                    sent_on_reused = None
                    return pipeline.receive(self._sock, parse, len(requests))
                return pipeline.exchange(self._connection(), requests, parse)
            except OSError as error:
                self._close_pipeline()
                if not (reused and _closed_by_node(error)):
                    raise self._connection_error(error) from error
                reused = False
            except BaseException as error:
                self._close_pipeline()  # Out of step with the node: never reused.
                if isinstance(error, ProtocolError):
                    raise pylibmc_error(error, self._node_name) from error
                raise

    def _connection_error(self, error: OSError) -> pylibmc.Error:
        return pylibmc.ConnectionError(
            f"pipelined call failed: {error},  host: {self._host}:{self._port}"
        )

    def _connection(self) -> socket.socket:
        if self._sock is None:
            behaviors = self.behaviors
            sock = socket.create_connection(
                (self._host, self._port), _seconds(behaviors["connect_timeout"], 4.0)
            )
            sock.settimeout(_seconds(behaviors["_poll_timeout"], 5.0))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
        return self._sock

    def _close_pipeline(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _closed_by_node(error: OSError) -> bool:
    """Whether the node closed the connection (reset, broken pipe, end of stream)."""
    return isinstance(error, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError))


def pylibmc_error(error: BaseException, node_name: str) -> Exception:
    """
    The pylibmc exception libmemcached raises for what the protocol layer reported, naming
    the node last, as libmemcached words it (the error log's per-node limit reads it there).
    """
    message = f"{error}, host: {node_name}" if node_name else str(error)
    if isinstance(error, ServerErrorReply):
        too_big = VALUE_TOO_LARGE in str(error)
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


class PylibmcAdapter:
    """
    pylibmc's rules for the event-loop path: values are (de)serialized by a pylibmc client's
    own ``serialize``/``deserialize`` (flags included) and compressed as pylibmc compresses
    for ``min_compress_len``, timeouts are the behaviours ``connect_timeout`` and
    ``_poll_timeout`` (ms), and failures become the pylibmc exceptions the sync path raises
    for them.
    """

    def __init__(self, options: dict[str, Any]) -> None:
        options = dict(options)
        self._min_compress_len: int = options.pop("min_compress_len", 0)
        behaviors = options["behaviors"]
        # Never connected: only its codec is used.
        self._codec = pylibmc.Client(["localhost"], **options)
        self.connect_timeout: float | None = _seconds(behaviors["connect_timeout"], 4.0)
        self.timeout: float | None = _seconds(behaviors["_poll_timeout"], 5.0)

    def encode_key(self, key: str) -> bytes:
        return key.encode()

    def serialize(self, key: bytes, value: Any) -> tuple[bytes, int]:
        data, flags = self._codec.serialize(value)
        return compressed(data, flags, self._min_compress_len)

    def deserialize(self, key: bytes, data: bytes, flags: int) -> Any:
        return self._codec.deserialize(*decompressed(data, flags))

    def library_error(self, error: Exception, node_name: str) -> Exception:
        return pylibmc_error(error, node_name)


class ElastiCache(AsyncCacheMixin, ClusterCacheMixin, PyLibMCCache):
    """
    ``PyLibMCCache`` over every node of an ElastiCache cluster.

    LOCATION is the cluster's configuration endpoint. Upper-case OPTIONS configure this
    backend (see ``options.BackendOptions``); all others go to ``pylibmc.Client`` exactly as
    with Django's own backend, with ``behaviors`` merged over ``DEFAULT_BEHAVIORS``.
    COMPRESS_MIN_LENGTH becomes pylibmc's ``min_compress_len`` for every store.
    """

    option_rules = OPTION_RULES
    server_errors = (pylibmc.Error, ClusterDiscoveryError, NodeError)
    # ClientError is memcached's CLIENT_ERROR: the request was wrong (incr of a non-number).
    caller_errors = (pylibmc.TooBig, pylibmc.BadKeyProvided, pylibmc.NotFound, pylibmc.ClientError)
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
        if "min_compress_len" in (params.get("OPTIONS") or {}):
            raise InvalidCacheBackendError(
                "OPTIONS['min_compress_len'] is an argument of pylibmc's set, not of its "
                "Client; use OPTIONS['COMPRESS_MIN_LENGTH'] to compress stored values"
            )
        super().__init__(server, params)
        self._options = {
            **self._options,
            "behaviors": {**DEFAULT_BEHAVIORS, **(self._options.get("behaviors") or {})},
            "min_compress_len": self.backend_options.compress_min_length,
        }
        self._class = PipelinedClient

    def _make_node_client(self, node: ClusterNode) -> pylibmc.Client:
        return self._class(node, **self._options)

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
