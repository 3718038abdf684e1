"""
Django cache backend for ElastiCache memcached clusters, driving pymemcache.

The twin of ``memcached.ElastiCache`` for clusters with in-transit encryption, which pylibmc
cannot reach: the same LOCATION rules, options, discovery, refresh, pooling and error policy,
over Django's ``PyMemcacheCache``. With ``OPTIONS['TLS']`` every node connection is TLS,
verified against the node's hostname from the cluster config while connecting to its listed IP.
"""

from __future__ import annotations

import functools
import hashlib
import socket
import ssl
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import pymemcache
from django.core.cache.backends.memcached import PyMemcacheCache
from pymemcache.client.rendezvous import RendezvousHash
from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheError,
    MemcacheIllegalInputError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
    MemcacheUnknownCommandError,
    MemcacheUnknownError,
)

from . import pipeline
from .async_backend import AsyncCacheMixin
from .backend import ClusterCacheMixin
from .cluster_utils import ClusterConfig, ClusterDiscoveryError, ClusterNode
from .compression import ZlibSerde
from .options import BackendRules
from .pool import NodeError
from .protocol import (
    VALUE_TOO_LARGE,
    ClientErrorReply,
    ConnectionClosed,
    ErrorReply,
    IllegalKey,
    Parser,
    ProtocolError,
    Request,
    ServerErrorReply,
    UnknownCommandReply,
    delete_request,
    key_not_asked_for,
    parse_deleted,
    parse_stats,
    parse_stored,
    parse_values,
    retrieval_request,
    stats_request,
    storage_request,
)
from .routing import ClusterClient, PooledNodeClient, UnsupportedCall, start_call

__all__ = [
    "DEFAULT_OPTIONS",
    "OPTION_RULES",
    "ElastiCache",
    "PymemcacheAdapter",
    "PymemcacheClusterClient",
    "RendezvousPlacement",
]

DEFAULT_OPTIONS: dict[str, Any] = {
    # Seconds; pymemcache waits forever by default.
    "connect_timeout": 1.0,
    "timeout": 1.0,
    "no_delay": True,
}
"""``pymemcache.Client`` keywords used unless OPTIONS sets them."""

MANAGED_BY_THE_BACKEND = (
    "tls_context",
    "socket_module",
    "use_pooling",
    "max_pool_size",
    "pool_idle_timeout",
    "lock_generator",
    "hasher",
    "retry_attempts",
    "retry_timeout",
    "dead_timeout",
    "enable_retry_delay",
)
"""``HashClient`` keywords the backend decides for every node: it pools, places and retries."""

OPTION_RULES = BackendRules(
    library="pymemcache",
    speaks_tls=True,
    managed_client_options=frozenset(MANAGED_BY_THE_BACKEND),
    reply_dropping_options=(("default_noreply",), ("ignore_exc",)),
)
"""What this backend refuses besides the shared rules: the client options it sets itself."""


def _node_score(text: str, seed: int) -> int:
    """
    Rendezvous score of one node for one key, computed in C. pymemcache's default,
    a pure-Python murmur3, costs about 12 us per node per key: 37 us to place one key on
    three nodes, against 2.4 us here, and a get_many(100) places a hundred.
    """
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def node_name(node: ClusterNode) -> str:
    """A node's name as ``HashClient`` names a server given as (hostname, port)."""
    return f"{node.hostname or node.ip}:{node.port}"


class RendezvousPlacement:
    """
    Rendezvous hashing over the nodes' ``hostname:port`` names, as pymemcache's ``HashClient``
    places keys over such names, with each score computed in C (``_node_score``).
    """

    def __init__(self, config: ClusterConfig) -> None:
        names = [node_name(node) for node in config.nodes]
        self._index = {name: index for index, name in enumerate(names)}
        self.ring = RendezvousHash(names, hash_function=_node_score)

    def node_index(self, key: str) -> int:
        return self._index[self.ring.get_node(key)]


class _ListedAddress:
    """
    A socket module for pymemcache that resolves the node's hostname to the IP the cluster
    config lists. pymemcache verifies TLS certificates against the host it connects to;
    connecting to the hostname and resolving it here verifies the name the certificate
    carries while the connection goes where the config says, without asking DNS.
    """

    def __init__(self, node: ClusterNode) -> None:
        self._node = node

    def getaddrinfo(self, host: str, port: int, *args: Any) -> list[tuple]:
        if (host, port) == (self._node.hostname, self._node.port) and self._node.ip:
            host = self._node.ip
        return socket.getaddrinfo(host, port, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(socket, name)


def serialized(client: pymemcache.Client, key: bytes, value: Any) -> tuple[bytes, int]:
    """A value as pymemcache sends it: its serde's output, a ``str`` encoded as the client's."""
    data, flags = client.serde.serialize(key, value)
    if not isinstance(data, bytes):
        data = str(data).encode(client.encoding)
    return data, flags


_PROTOCOL_ERRORS: list[tuple[type[Exception], type[Exception]]] = [
    (ServerErrorReply, MemcacheServerError),
    (ClientErrorReply, MemcacheClientError),
    (UnknownCommandReply, MemcacheUnknownCommandError),
    (IllegalKey, MemcacheIllegalInputError),
    (ProtocolError, MemcacheUnknownError),
    (ConnectionClosed, MemcacheUnexpectedCloseError),
]


def pymemcache_error(error: Exception) -> Exception:
    """The pymemcache exception for what the protocol layer reported; socket errors as they are."""
    for ours, theirs in _PROTOCOL_ERRORS:
        if isinstance(error, ours):
            return theirs(str(error))
    return error


class _NodeClient(pymemcache.Client):
    """
    A ``pymemcache.Client`` whose ``set_many`` works over TLS, and whose ``get_many`` can be
    sent before its reply is read (``start_get_multi``).

    After any ``Exception`` the client is in step with the node, so the pool takes it back
    (see ``pool``): pymemcache closes its socket on any ``Exception`` raised while a command
    is sent or its reply read (only on an ``Exception``: a ``KeyboardInterrupt`` leaves the
    reply on the socket, which is why the pool closes the client then), and this class's own
    exchanges close it on an exception of any class. A two-step call (``start_*``) owes the
    node's replies from its first write until its reader has read them all
    (``replies_owed``): the pool closes a client that owes replies, whatever the exception.
    """

    _replies_owed_on: socket.socket | None = None

    @property
    def replies_owed(self) -> bool:
        """Whether requests went out on the open connection whose replies were not all read."""
        return self._replies_owed_on is not None and self._replies_owed_on is self.sock

    def _extract_value(self, *args: Any) -> Any:
        """
        pymemcache's, except that an exception raised from outside while pymemcache splits a
        ``VALUE`` line (a signal handler's, for a request timeout) is raised as itself:
        pymemcache turns any ``Exception`` raised there into ``ValueError("Unable to parse
        line ...")``, which would hide the interruption from the code that raised it.
        """
        try:
            return super()._extract_value(*args)
        except ValueError as error:
            interruption = error.__context__
            if isinstance(interruption, Exception) and not isinstance(interruption, ValueError):
                raise interruption from None
            raise

    def set_many(
        self, values: dict[Any, Any], expire: int = 0, noreply: bool | None = None, **extra: Any
    ) -> list[Any]:
        return self.start_set_multi(values, expire, noreply, **extra)()

    set_multi = set_many

    def delete_many(self, keys: Iterable[Any], noreply: bool | None = None) -> bool:
        return self.start_delete_multi(keys, noreply)()

    delete_multi = delete_many

    two_step_calls: ClassVar[dict[str, Any]] = {
        "get_multi": pymemcache.Client.get_multi,
        "set_multi": set_many,
        "delete_multi": delete_many,
    }
    """The calls whose ``start_`` form ``routing.start_call`` may use instead."""

    def start_set_multi(
        self, values: dict[Any, Any], expire: int = 0, noreply: bool | None = None, **extra: Any
    ) -> Callable[[], list[Any]]:
        """
        ``set_many`` in two steps, as ``start_get_multi``: the keys not stored. Every key's
        reply is read; an error reply is raised, as pymemcache does, once all were read.
        With ``noreply`` or pymemcache's extra arguments, pymemcache does the call.
        """
        if noreply is None:
            noreply = self.default_noreply
        if noreply or extra:
            return functools.partial(super().set_many, values, expire, noreply, **extra)
        keys = list(values)
        self._check_integer(expire, "expire")
        requests = []
        for key in keys:
            key_bytes = self.check_key(key, self.key_prefix)
            data, flags = serialized(self, key_bytes, values[key])
            requests.append(storage_request(b"set", key_bytes, flags, expire, data))
        read_replies = self._start_exchange(requests, parse_stored)

        def read_failed() -> list[Any]:
            replies = self._raise_refusal(read_replies())
            return [key for key, reply in zip(keys, replies, strict=True) if reply is not True]

        return read_failed

    def start_delete_multi(
        self, keys: Iterable[Any], noreply: bool | None = None
    ) -> Callable[[], bool]:
        """``delete_many`` in two steps, as ``start_set_multi``: True, as pymemcache's."""
        if noreply is None:
            noreply = self.default_noreply
        if noreply:
            return functools.partial(super().delete_many, keys, noreply)
        requests = [delete_request(self.check_key(key, self.key_prefix)) for key in keys]
        read_replies = self._start_exchange(requests, parse_deleted)

        def read_deleted() -> bool:
            self._raise_refusal(read_replies())
            return True

        return read_deleted

    def start_get_multi(self, keys: list[Any]) -> Callable[[], dict[Any, Any]]:
        """
        ``get_many(keys)`` in two steps: the request is sent now (pymemcache's own key checks
        raise here), and the returned function reads the reply, so the caller can send to
        other nodes in between. Errors are pymemcache's, raised by the returned function.
        A reply holding a key not asked for means the stream is out of step: the
        connection is closed and ``MemcacheUnknownError`` raised.
        """
        prefixed = [self.check_key(key, self.key_prefix) for key in keys]
        originals = dict(zip(prefixed, keys, strict=True))
        read_replies = self._start_exchange([retrieval_request(prefixed)], parse_values)

        def read_reply() -> dict[Any, Any]:
            (found,) = self._raise_refusal(read_replies())
            deserialize = self.serde.deserialize
            try:
                return {
                    originals[key]: deserialize(key, data, flags)
                    for key, (flags, data) in found.items()
                }
            except KeyError:
                out_of_step = key_not_asked_for(found, originals)
                if out_of_step is None:
                    raise
                self.close()
                host, port = self.server
                raise MemcacheUnknownError(f"Cache node {host}:{port}: {out_of_step}") from None

        return read_reply

    def _start_exchange(
        self, requests: Sequence[Request], parse: Parser
    ) -> Callable[[], list[Any]]:
        """
        The requests' first write sent now; the returned function reads its replies and
        runs the rest, so that a multi-node call sends to every node before it waits for
        any. Over TLS a write carries at most ``pipeline.TLS_WRITE_BYTES``: memcached 1.6.18
        stops reading a TLS connection that delivers more commands at once than one TLS
        record holds, so pymemcache's single write of a batch would time out.
        """
        max_write_bytes = None if self.tls_context is None else pipeline.TLS_WRITE_BYTES
        first = pipeline.first_write(requests, max_write_bytes)

        def send_first_write(sock: socket.socket) -> None:
            self._replies_owed_on = sock
            pipeline.send(sock, requests[:first])

        try:
            self._exchange(send_first_write)
        except OSError as error:
            failure = error

            def raise_failure() -> list[Any]:
                raise failure

            return raise_failure

        def read_replies() -> list[Any]:
            replies = self._exchange(lambda sock: pipeline.receive(sock, parse, first))
            if first < len(requests):
                rest = requests[first:]
                replies += self._exchange(
                    lambda sock: pipeline.exchange(sock, rest, parse, max_write_bytes)
                )
            self._replies_owed_on = None
            return replies

        return read_replies

    def _raise_refusal(self, replies: list[Any]) -> list[Any]:
        """The replies, unless one is a refusal: then pymemcache's exception for it."""
        for reply in replies:
            if isinstance(reply, ErrorReply):
                self.close()  # After an error reply the connection is not trusted further.
                raise pymemcache_error(reply)
        return replies

    def flush_all(self, delay: int = 0, noreply: bool | None = None) -> bool:
        """
        A flush without a delay is sent as a bare ``flush_all``: ElastiCache Serverless
        refuses the command with any delay argument, and every memcached reads both alike.
        """
        if delay:
            return super().flush_all(delay, noreply)
        noreply = self.default_noreply if noreply is None else noreply
        command = b"flush_all noreply\r\n" if noreply else b"flush_all\r\n"
        results = self._misc_cmd([command], b"flush_all", noreply)
        return noreply or results[0] == b"OK"

    def stats_as_sent(self, group: str | None = None) -> dict[str, bytes]:
        """
        The node's ``stats`` (or ``stats <group>``) with every value as the node sent it,
        as pylibmc's ``get_stats`` gives them; pymemcache's ``stats`` converts them.
        """
        (stats,) = self._exchange(
            lambda sock: pipeline.exchange(sock, [stats_request(group)], parse_stats)
        )
        if isinstance(stats, ErrorReply):
            raise pymemcache_error(stats)
        return stats

    def _exchange(self, talk: Callable[[socket.socket], Any]) -> Any:
        """
        ``talk`` on the client's socket, connected first if need be, as pymemcache's own
        calls do: on any failure the connection is closed, and a reply that is not
        memcached's, or a connection the node closed, raises pymemcache's exception for it.
        """
        if self.sock is None:
            self._connect()
        assert self.sock is not None
        try:
            return talk(self.sock)
        except BaseException as error:
            self.close()
            if isinstance(error, (ProtocolError, ConnectionClosed)):
                raise pymemcache_error(error) from error
            raise


def _routed_store(command: str) -> Callable[..., bool]:
    """pymemcache's storage ``command`` with its arguments, on the key's node (as ``set``)."""

    def call(
        self: ClusterClient,
        key: Any,
        value: Any,
        expire: int = 0,
        noreply: bool | None = None,
        flags: int | None = None,
    ) -> bool:
        return self.write(command, key, value, expire, noreply, flags)

    call.__name__ = call.__qualname__ = command
    return call


class PymemcacheClusterClient(ClusterClient):
    """
    The backend's ``_cache``, with the surface of pymemcache's ``HashClient`` over the node
    list, for code that reaches into ``cache._cache`` as into Django's ``PyMemcacheCache``'s:
    each keyed call goes to its key's node, ``clients`` holds each node's pool as one
    client, and ``get_stats`` lists every node's statistics as pylibmc does, so that
    monitoring written for either library works, over TLS too.
    """

    def __init__(self, *args: Any, client_options: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client_options = client_options

    # Attributes

    @property
    def default_kwargs(self) -> dict[str, Any]:
        """The keywords every node's ``pymemcache.Client`` is built with (``socket_module``
        aside: each node's resolves the node's hostname to its listed IP)."""
        return dict(self._client_options)

    @property
    def clients(self) -> dict[str, PooledNodeClient]:
        """Each node's pool as one client, by ``hostname:port`` as ``HashClient`` names them."""
        return {
            node_name(pool.node): PooledNodeClient(pool, self._is_node_failure)
            for pool in self.pools
        }

    @property
    def hasher(self) -> RendezvousHash:
        """The rendezvous hash over the ``clients`` names that places every key."""
        assert isinstance(self._placement, RendezvousPlacement)
        return self._placement.ring

    @property
    def key_prefix(self) -> bytes:
        return self._client_options.get("key_prefix", b"")

    @property
    def encoding(self) -> str:
        return self._client_options.get("encoding", "ascii")

    @property
    def tls_context(self) -> ssl.SSLContext | None:
        return self._client_options.get("tls_context")

    def add_server(self, *args: Any, **kwargs: Any) -> None:
        raise UnsupportedCall(
            "the nodes of an ElastiCache cluster come from its configuration endpoint; "
            "add a node to the cluster and the backend will find it"
        )

    remove_server = add_server

    # Keyed calls, with pymemcache's keywords

    def get(self, key: Any, default: Any = None) -> Any:
        return self.call("get", key, default)

    def gets(self, key: Any, default: Any = None, cas_default: Any = None) -> Any:
        return self.call("gets", key, default, cas_default)

    set = _routed_store("set")
    add = _routed_store("add")
    replace = _routed_store("replace")
    append = _routed_store("append")
    prepend = _routed_store("prepend")

    def cas(
        self,
        key: Any,
        value: Any,
        cas: Any,
        expire: int = 0,
        noreply: bool = False,
        flags: Any = None,
    ) -> bool | None:
        return self.write("cas", key, value, cas, expire, noreply, flags)

    def delete(self, key: Any, noreply: bool | None = None) -> bool:
        return self.write("delete", key, noreply)

    def incr(self, key: Any, value: int, noreply: bool = False) -> int | None:
        return self.call("incr", key, value, noreply)

    def decr(self, key: Any, value: int, noreply: bool = False) -> int | None:
        return self.call("decr", key, value, noreply)

    def touch(self, key: Any, expire: int = 0, noreply: bool | None = None) -> bool:
        return self.call("touch", key, expire, noreply)

    # Multi-key calls, under HashClient's names too

    get_many = ClusterClient.get_multi
    set_many = ClusterClient.set_multi

    def delete_many(self, keys: Iterable[Any], noreply: bool | None = None) -> bool:
        return ClusterClient.delete_multi(self, keys, noreply)

    delete_multi = delete_many

    def gets_many(self, keys: Iterable[Any]) -> dict[Any, tuple[Any, Any]]:
        found: dict[Any, tuple[Any, Any]] = {}
        for node_found in self._on_every_node(
            self.by_pool(keys),
            functools.partial(start_call, "gets_many"),
        ):
            found.update(node_found)
        return found

    gets_multi = gets_many

    # Calls on every node

    def flush_all(self, delay: int = 0, noreply: bool | None = None) -> None:
        self.on_every_node(lambda client: client.flush_all(delay, noreply))

    def get_stats(self, stat_args: str | None = None) -> list[tuple[bytes, dict[str, bytes]]]:
        """
        Each node's ``stats`` in pylibmc's shape, ``(b"hostname:port (index)", {stat:
        value})`` with the values as sent: ``HashClient`` has no call for every node's stats,
        and monitoring tools (django-memcache-status) read pylibmc's.
        """
        replies = self.on_every_node(lambda client: client.stats_as_sent(stat_args))
        return [
            (f"{node_name(pool.node)} ({index})".encode(), stats)
            for index, (pool, stats) in enumerate(replies)
        ]

    close = quit = ClusterClient.disconnect_all


class PymemcacheAdapter:
    """
    pymemcache's rules for the event-loop path, from a never-connected ``pymemcache.Client``
    built with the backend's options: its key check (prefix, unicode, length), its serde,
    its ``connect_timeout`` and ``timeout`` (s), and its exception classes. Socket errors
    (refused, timed out, TLS) are raised as they are, as pymemcache lets them through.
    """

    def __init__(self, options: dict[str, Any]) -> None:
        self._codec = pymemcache.Client(("localhost", 11211), **options)
        self.connect_timeout = self._codec.connect_timeout
        self.timeout = self._codec.timeout

    def encode_key(self, key: str) -> bytes:
        return self._codec.check_key(key, self._codec.key_prefix)

    def serialize(self, key: bytes, value: Any) -> tuple[bytes, int]:
        return serialized(self._codec, key, value)

    def deserialize(self, key: bytes, data: bytes, flags: int) -> Any:
        return self._codec.serde.deserialize(key, data, flags)

    def library_error(self, error: Exception, node_name: str) -> Exception:
        return pymemcache_error(error)


class ElastiCache(AsyncCacheMixin, ClusterCacheMixin, PyMemcacheCache):
    """
    ``PyMemcacheCache`` over every node of an ElastiCache cluster, optionally over TLS.

    LOCATION and the upper-case OPTIONS are those of ``memcached.ElastiCache``; all others
    go to each node's ``pymemcache.Client`` as with Django's own backend, over
    ``DEFAULT_OPTIONS``. The serde (Django's ``pickle_serde`` or the one OPTIONS gives) is
    wrapped in a ``compression.ZlibSerde`` compressing as COMPRESS_MIN_LENGTH says, and
    reading compressed values back even with compression off: values written while it was
    on stay readable, as pylibmc reads them whatever its settings.
    """

    option_rules = OPTION_RULES
    server_errors = (MemcacheError, OSError, ClusterDiscoveryError, NodeError)
    # CLIENT_ERROR replies (incr of a non-number) and keys or values pymemcache refuses.
    caller_errors = (MemcacheClientError,)
    connection_errors = (OSError, MemcacheUnexpectedCloseError)

    def __init__(self, server: str, params: dict[str, Any]) -> None:
        super().__init__(server, params)
        self._options = {**DEFAULT_OPTIONS, **self._options}
        self._options["serde"] = ZlibSerde(
            self._options["serde"], self.backend_options.compress_min_length
        )
        self._class = _NodeClient

    def _make_node_client(self, node: ClusterNode) -> pymemcache.Client:
        return self._class(
            (node.hostname or node.ip, node.port),
            socket_module=_ListedAddress(node),
            tls_context=self.backend_options.tls,
            **self._options,
        )

    def _close_node_client(self, client: pymemcache.Client) -> None:
        client.close()

    def _make_async_adapter(self) -> PymemcacheAdapter:
        return PymemcacheAdapter(self._options)

    def _cluster_client_class(self) -> Callable[..., PymemcacheClusterClient]:
        options = {**self._options, "tls_context": self.backend_options.tls}
        return functools.partial(PymemcacheClusterClient, client_options=options)

    def _placement(self, config: ClusterConfig) -> RendezvousPlacement:
        return RendezvousPlacement(config)

    def _is_caller_error(self, error: BaseException) -> bool:
        """memcached refuses a value over its item size with a SERVER_ERROR, yet the fault is
        the caller's, as pylibmc's ``TooBig`` says on the other backend."""
        if isinstance(error, MemcacheServerError) and VALUE_TOO_LARGE in str(error):
            return True
        return super()._is_caller_error(error)
