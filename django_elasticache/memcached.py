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
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, NoReturn

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
from .compression import ZLIB_FLAG, compressed, decompressed
from .options import BackendRules
from .pool import NodeError
from .protocol import (
    VALUE_TOO_LARGE,
    ClientErrorReply,
    ErrorReply,
    IllegalKey,
    KeyTooLong,
    Parser,
    ProtocolError,
    Request,
    ServerErrorReply,
    counter_request,
    decoded_values,
    delete_request,
    key_not_asked_for,
    parse_counter,
    parse_deleted,
    parse_stored,
    parse_values,
    retrieval_request_for,
    storage_request,
)
from .routing import ClusterClient, UnsupportedCall, start_call

__all__ = [
    "DEFAULT_BEHAVIORS",
    "OPTION_RULES",
    "ElastiCache",
    "LibmemcachedPlacement",
    "PipelinedClient",
    "PylibmcAdapter",
    "PylibmcClusterClient",
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

    ``min_compress_len`` is pylibmc's argument of that name, given to every ``set_multi``
    that does not pass one: Django never does. The pipelined ``set_multi`` compresses as
    pylibmc does (``compression.compressed``). ``set``, ``add`` and ``replace`` are
    pylibmc's own, called in C with no Python in between: the cluster client passes them
    the backend's ``min_compress_len`` (``PylibmcClusterClient.set``).

    After any ``Exception`` the client is in step with the node, so the pool takes it back
    (see ``pool``): libmemcached keeps its own connection's state, and a Python exception
    (a signal handler's) can only land before or after one of its calls, never inside; and
    an exception of any class raised while this client's own socket is sending or reading
    closes that socket, so no reply is ever left on it for the next call to read.

    ``incr`` and ``decr`` take memcached's whole range of deltas, 0 to 2**64 - 1: pylibmc
    passes the delta to libmemcached as a 32-bit int, so a larger one goes over the
    client's own socket (text protocol only).

    A two-step call (``start_*``) owes the node's replies from its first write until its
    reader has read them all (``replies_owed``): an exception raised in between, before the
    reading began, leaves them on the socket, so the pool closes a client that owes replies.
    """

    _replies_owed_on: socket.socket | None = None

    @property
    def replies_owed(self) -> bool:
        """Whether requests went out on the open connection whose replies were not all read."""
        return self._replies_owed_on is not None and self._replies_owed_on is self._sock

    def __init__(self, node: ClusterNode, min_compress_len: int = 0, **options: Any) -> None:
        super().__init__([node.address], **options)
        self._min_compress_len = min_compress_len
        self._host = node.ip or node.hostname
        self._port = node.port
        self._node_name = f"{self._host}:{self._port}"
        self._pipelines = not options.get("binary") and options.get("username") is None
        self._sock: socket.socket | None = None

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
        return self.start_set_multi(mapping, time, **extra)()

    def delete_multi(self, keys: Iterable[Any], **extra: Any) -> bool:
        return self.start_delete_multi(keys, **extra)()

    two_step_calls: ClassVar[dict[str, Any]] = {
        "get_multi": pylibmc.Client.get_multi,
        "set_multi": set_multi,
        "delete_multi": delete_multi,
    }
    """The calls whose ``start_`` form ``routing.start_call`` may use instead."""

    def start_set_multi(
        self, mapping: Mapping[Any, Any], time: int = 0, **extra: Any
    ) -> Callable[[], list[Any]]:
        """``set_multi`` in two steps, as ``start_get_multi``: the keys not stored."""
        keys = list(mapping)
        encoded = self._encoded(keys, extra)
        if encoded is None:
            return functools.partial(super().set_multi, mapping, time, **self._compressing(extra))
        serialize, min_length = self.serialize, self._min_compress_len
        requests = []
        for key, key_bytes in zip(keys, encoded, strict=True):
            data, flags = serialize(mapping[key])
            data, flags = compressed(data, flags, min_length)
            requests.append(storage_request(b"set", key_bytes, flags, time, data))
        read_replies = self._start_exchange(requests, parse_stored)

        def read_failed() -> list[Any]:
            replies = read_replies()
            too_large = [
                key
                for key, reply in zip(keys, replies, strict=True)
                if isinstance(reply, ServerErrorReply) and VALUE_TOO_LARGE in str(reply)
            ]
            if too_large:
                message = f"values larger than the node's item size limit: {too_large!r}"
                raise pylibmc.TooBig(message)
            return [key for key, reply in zip(keys, replies, strict=True) if reply is not True]

        return read_failed

    def start_delete_multi(self, keys: Iterable[Any], **extra: Any) -> Callable[[], bool]:
        """``delete_multi`` in two steps, as ``start_get_multi``: whether every key existed."""
        keys = list(keys)
        encoded = self._encoded(keys, extra)
        if encoded is None:
            return functools.partial(super().delete_multi, keys, **extra)
        read_replies = self._start_exchange(
            [delete_request(key) for key in encoded], parse_deleted
        )
        return lambda: all(reply is True for reply in read_replies())

    def start_get_multi(self, keys: list[Any]) -> Callable[[], dict[Any, Any]]:
        """
        ``get_multi(keys)`` in two steps: the request is sent now, and the returned function
        reads the reply, so the caller can send to other nodes in between. Its errors are
        those of the pipelined calls, raised by the returned function.
        """
        request = retrieval_request_for(keys) if self._pipelines else None
        if request is None:
            return functools.partial(super().get_multi, keys)
        sent, asked = request
        read_replies = self._start_exchange([sent], parse_values)

        def read_reply() -> dict[Any, Any]:
            (found,) = read_replies()
            if isinstance(found, ErrorReply):
                raise pylibmc_error(found, self._node_name)
            try:
                return decoded_values(
                    found,
                    asked,
                    self.deserialize,
                    ZLIB_FLAG,
                    self._deserialize_compressed,
                    PYLIBMC_TEXT_FLAGS,
                )
            except KeyError:
                out_of_step = key_not_asked_for(found, asked)
                if out_of_step is None:
                    raise
                self._close_pipeline()
                raise pylibmc_error(out_of_step, self._node_name) from None

        return read_reply

    def _deserialize_compressed(self, data: bytes, flags: int) -> Any:
        return self.deserialize(*decompressed(data, flags))

    def _start_exchange(
        self, requests: Sequence[Request], parse: Parser
    ) -> Callable[[], list[Any]]:
        """
        ``_exchange(requests, parse)`` in two steps: the first write is sent now, and the
        returned function reads its replies and runs the rest (a batch longer than one
        write, see ``pipeline``), so that a multi-node call sends to every node before it
        waits for any. Errors are raised by the returned function, as ``_exchange`` raises
        them; an exception of any class while sending closes the connection, since the
        requests may have gone out in part and their replies must never be read.
        """
        first = pipeline.first_write(requests)
        sent_on_reused: bool | None = self._sock is not None
        failure: OSError | None = None
        try:
            self._replies_owed_on = sock = self._connection()
            pipeline.send(sock, requests[:first])
        except OSError as error:
            self._close_pipeline()
            failure = None if sent_on_reused and _closed_by_node(error) else error
            sent_on_reused = None  # Not sent: reading the replies sends the requests again.
        except BaseException:
            self._close_pipeline()
            raise

        def read_replies() -> list[Any]:
            if failure is not None:
                raise self._connection_error(failure) from failure
            replies = self._exchange(requests[:first], parse, sent_on_reused)
            if first < len(requests):
                replies += self._exchange(requests[first:], parse)
            self._replies_owed_on = None
            return replies

        return read_replies

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
        requests: Sequence[Request],
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
    if isinstance(error, KeyTooLong):
        # pylibmc checks the length itself, before libmemcached, and raises a ValueError.
        return ValueError(f"key length {error.length} too long, max is {MAX_KEY_BYTES}")
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

    # ``str.encode`` itself, called as ``encode_key(key)``: no frame of Python on every aget.
    encode_key = staticmethod(str.encode)

    def serialize(self, key: bytes, value: Any) -> tuple[bytes, int]:
        data, flags = self._codec.serialize(value)
        return compressed(data, flags, self._min_compress_len)

    def deserialize(self, key: bytes, data: bytes, flags: int) -> Any:
        if flags & ZLIB_FLAG:  # ``decompressed``'s test, written in: most values are not.
            data, flags = decompressed(data, flags)
        return self._codec.deserialize(data, flags)

    def library_error(self, error: Exception, node_name: str) -> Exception:
        return pylibmc_error(error, node_name)


_MISSING = object()

PYLIBMC_TEXT_FLAGS = 16
"""
The flags pylibmc stores a ``str`` with (its UTF-8 bytes); flags 0 mark ``bytes`` stored as
they are. ``decoded_values`` decodes both without calling ``deserialize``, and
``tests/test_speedups.py`` checks that pylibmc agrees.
"""


def _refuse_behaviour_change(*args: Any, **kwargs: Any) -> NoReturn:
    raise UnsupportedCall(
        "the behaviours of a cluster's clients are set by OPTIONS['behaviors'] for every "
        "client of every node: they decide where keys are placed"
    )


class FixedBehaviors(dict):
    """
    The behaviours of every node's clients, as pylibmc's ``behaviors`` dict shows them, but
    read-only: pylibmc's would set a changed behaviour on its client.
    """

    __setitem__ = __delitem__ = update = setdefault = pop = popitem = clear = (
        _refuse_behaviour_change
    )


def _routed_store(command: str) -> Callable[..., bool]:
    """
    pylibmc's storage ``command`` with its arguments, on the key's node (as ``set``), with
    the backend's ``min_compress_len`` unless the call gives one (Django never does).
    """

    def call(
        self: PylibmcClusterClient,
        key: Any,
        val: Any,
        time: int = 0,
        min_compress_len: int | None = None,
        compress_level: int = -1,
    ) -> bool:
        if min_compress_len is None:
            min_compress_len = self._min_compress_len
        return self.write(command, key, val, time, min_compress_len, compress_level)

    call.__name__ = call.__qualname__ = command
    return call


def _prefixed_store(method: str) -> Callable[..., list[Any]]:
    """
    pylibmc's multi-key storage ``method`` (``set_multi``, ``add_multi``), routed by the
    prefixed key: the keys not stored, unprefixed. Only the arguments given reach the node
    clients: without them, ``PipelinedClient`` pipelines ``set_multi``.
    """

    def call(
        self: ClusterClient,
        mapping: Mapping[Any, Any],
        time: int = 0,
        key_prefix: Any = None,
        min_compress_len: int | None = None,
        compress_level: int = -1,
    ) -> list[Any]:
        extra: dict[str, Any] = {}
        if min_compress_len is not None:
            extra["min_compress_len"] = min_compress_len
        if compress_level != -1:
            extra["compress_level"] = compress_level
        if not key_prefix:
            return self.store_multi(method, mapping, time, **extra)
        originals = {key_prefix + key: key for key in mapping}
        prefixed = {key_prefix + key: value for key, value in mapping.items()}
        failed = self.store_multi(method, prefixed, time, **extra)
        return [originals[key] for key in failed]

    call.__name__ = call.__qualname__ = method
    return call


class PylibmcClusterClient(ClusterClient):
    """
    The backend's ``_cache``, with the surface of ``pylibmc.Client`` over the node list,
    for code that reaches into ``cache._cache`` as into Django's ``PyLibMCCache``'s: each
    keyed call goes to its key's node, a multi-key call's ``key_prefix`` is part of the key
    it routes by (the key stored), per-node calls (``get_stats``, ``flush_all``) reach every
    node, and the attributes are those a pylibmc client over the node names would have.
    """

    def __init__(self, *args: Any, client_options: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client_options = client_options
        self._min_compress_len: int = client_options.get("min_compress_len", 0)
        if self._min_compress_len:
            self.store = self.set  # pylibmc's own default (0) is the only one ``write`` skips.

    @functools.cached_property
    def _unconnected(self) -> pylibmc.Client:
        """A pylibmc client over the node names with the backend's options, never connected."""
        options = {k: v for k, v in self._client_options.items() if k != "min_compress_len"}
        return pylibmc.Client(self.addresses, **options)

    # Attributes

    @property
    def addresses(self) -> list[str]:
        """The servers, as their names: what keys are placed by."""
        return [node_name(node) for node in self.config.nodes]

    @property
    def binary(self) -> bool:
        return bool(self._client_options.get("binary", False))

    def get_behaviors(self) -> FixedBehaviors:
        return FixedBehaviors(self._unconnected.behaviors)

    def set_behaviors(self, behaviors: Mapping[str, Any]) -> None:
        _refuse_behaviour_change()

    behaviors = property(get_behaviors, set_behaviors)

    def hash(self, key: Any) -> int:
        """The index in ``addresses`` of the node that holds ``key``."""
        return self._placement.node_index(key)

    def serialize(self, value: Any) -> tuple[bytes, int]:
        return self._unconnected.serialize(value)

    def deserialize(self, data: bytes, flags: int) -> Any:
        return self._unconnected.deserialize(data, flags)

    def clone(self) -> PylibmcClusterClient:
        """This client: it is already safe to share between threads, its pools are."""
        return self

    # Keyed calls pylibmc adds to those Django makes

    set = _routed_store("set")
    add = _routed_store("add")
    replace = _routed_store("replace")

    def append(self, key: Any, val: Any) -> bool:
        return self.write("append", key, val)

    def prepend(self, key: Any, val: Any) -> bool:
        return self.write("prepend", key, val)

    def gets(self, key: Any) -> tuple[Any, int | None]:
        return self.call("gets", key)

    def cas(self, key: Any, val: Any, cas: int, time: int = 0) -> bool:
        return self.write("cas", key, val, cas, time)

    def __getitem__(self, key: Any) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        if not self.set(key, value):
            raise KeyError(f"failed setting {key!r}")

    def __delitem__(self, key: Any) -> None:
        if not self.delete(key):
            raise KeyError(key)

    def __contains__(self, key: Any) -> bool:
        return self.get(key, _MISSING) is not _MISSING

    # Multi-key calls, with pylibmc's key_prefix

    def get_multi(self, keys: Iterable[Any], key_prefix: Any = None) -> dict[Any, Any]:
        if not key_prefix:
            return super().get_multi(keys)
        originals = {key_prefix + key: key for key in keys}
        found = super().get_multi(originals)
        return {originals[key]: value for key, value in found.items()}

    set_multi = _prefixed_store("set_multi")
    add_multi = _prefixed_store("add_multi")

    def delete_multi(self, keys: Iterable[Any], key_prefix: Any = None) -> bool:
        if key_prefix:
            keys = [key_prefix + key for key in keys]
        return super().delete_multi(keys)

    def incr_multi(self, keys: Iterable[Any], key_prefix: Any = None, delta: int = 1) -> None:
        """Add ``delta`` to every key; pylibmc's ``NotFound`` if any is missing."""
        prefixed = [key_prefix + key for key in keys] if key_prefix else list(keys)
        self._on_every_node(
            self.by_pool(prefixed),
            functools.partial(start_call, "incr_multi", delta=delta),
        )

    # Calls on every node

    def flush_all(self, time: int = 0) -> bool:  # type: ignore[override]  # pylibmc's: True
        return all(flushed for _, flushed in self.on_every_node(lambda c: c.flush_all(time)))

    def get_stats(self, stat_args: str | None = None) -> list[tuple[bytes, dict[str, bytes]]]:
        """
        Each node's ``stats`` as pylibmc lists them: ``(b"name:port (index)", {stat: value})``.
        """
        args = () if stat_args is None else (stat_args,)
        replies = self.on_every_node(lambda client: client.get_stats(*args))
        return [
            (f"{name} ({index})".encode(), reply[0][1])
            for index, (name, (_, reply)) in enumerate(zip(self.addresses, replies, strict=True))
        ]


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

    def _cluster_client_class(self) -> Callable[..., PylibmcClusterClient]:
        return functools.partial(PylibmcClusterClient, client_options=self._options)

    def _placement(self, config: ClusterConfig) -> LibmemcachedPlacement:
        return LibmemcachedPlacement(config, self._options["behaviors"])

    def _error_source(self, error: Exception) -> str:
        """libmemcached names the failing node at the end of its message."""
        match = _FAILED_HOST.search(str(error))
        return match[1] if match else super()._error_source(error)
