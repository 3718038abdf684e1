"""
The event loop's connections to the cache nodes, and the calls the async cache methods make.

Django's async cache methods are ``sync_to_async`` around the sync ones: every call hops to a
thread and back. Here they talk memcached's text protocol (``protocol``) on the loop
itself, to the very node the sync path uses for the key: routing asks the backend's current
``ClusterClient`` (the same placement object), and each node's health is its ``NodePool``'s,
shared with the sync path.

Connections belong to an event loop. Each loop has its own ``NodeChannel`` per node:

- in clear text, one connection per node, and concurrent requests are pipelined over it
  (written as they come, replies matched in order), which served 50 concurrent requests
  better than a pool of connections used one request at a time;
- over TLS, up to ``POOL_SIZE`` connections per node with one request in flight on each:
  memcached 1.6 stalls on a TLS connection that delivers several commands at once.

A loop's connections are closed when the loop shuts down its async generators (as
``asyncio.run`` and asgiref do), or, for a loop closed without that, when the next loop
first uses the cache. A forked child starts with no connections and never closes the
parent's.

A client library is known only through a ``LibraryAdapter``: the backend module for that
library supplies how keys are encoded, how values are (de)serialized (so both paths read what
the other wrote, flags included), the timeouts, and which exception the library itself would
raise for each failure.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from typing import Any, Final, Protocol

from . import forks
from .cluster_utils import ClusterNode, format_address
from .pool import NodePool
from .protocol import (
    ClientErrorReply,
    ConnectionClosed,
    ErrorReply,
    IllegalKey,
    Parser,
    ProtocolError,
    Request,
    check_key,
    counter_request,
    delete_request,
    flush_all_request,
    joined,
    key_not_asked_for,
    parse_counter,
    parse_deleted,
    parse_flushed,
    parse_stored,
    parse_touched,
    parse_values,
    request_pieces,
    retrieval_request,
    storage_request,
    touch_request,
)
from .routing import ClusterClient, log_invalidation_failure

__all__ = ["MISSING", "AsyncClusterClient", "ConnectionClosed", "LibraryAdapter"]

logger = logging.getLogger("django_elasticache")

PIPELINE_DEPTH = 1024
"""Requests in flight on one clear-text connection; more wait for a reply to come back."""

MISSING = object()
"""What ``AsyncClusterClient.get`` returns for a key the node does not hold."""


class LibraryAdapter(Protocol):
    """What the event-loop path needs to know of the backend's client library."""

    connect_timeout: float | None
    """Seconds to open a connection (TLS handshake included); ``None``: no limit."""
    timeout: float | None
    """Seconds to wait for a reply; ``None``: no limit."""

    def encode_key(self, key: str) -> bytes:
        """The key as the library sends it."""

    def serialize(self, key: bytes, value: Any) -> tuple[bytes, int]:
        """A value as the library stores it: data and flags."""

    def deserialize(self, key: bytes, data: bytes, flags: int) -> Any:
        """A stored value as the library reads it back."""

    def library_error(self, error: Exception, node_name: str) -> Exception:
        """
        The exception the library raises for this failure of a call to ``node_name``: an
        ``OSError`` (connection, timeout, TLS), ``ConnectionClosed``, or an
        ``protocol.ProtocolError`` (a refusal, a malformed reply, an illegal key).
        """


_Request = tuple[Parser, "asyncio.Future[Any]", float]
"""
A request on the wire: how to read its reply, who waits for it, and since when. A plain
tuple, read by position (``PARSER``, ``FUTURE``, ``SENT``): one is made per call.
"""
PARSER: Final = 0
FUTURE: Final = 1
SENT: Final = 2


def loop_clock(loop: asyncio.AbstractEventLoop) -> Callable[[], float]:
    """
    ``loop.time``, or the function it calls where that is asyncio's own method
    (``time.monotonic``): read twice a call, it then costs no Python frame. Any other clock
    (uvloop's, a subclass's, one a test set on the loop) is asked itself: the loop's timers
    run on it.
    """
    clock = loop.time
    if getattr(clock, "__func__", None) is asyncio.BaseEventLoop.time:
        return time.monotonic
    return clock


class NodeConnection(asyncio.Protocol):
    """
    One connection to one node on one loop. Requests are written as they come and their
    replies matched to them in order; a caller that gives up (cancelled) leaves its slot in
    the queue, so the reply it no longer wants is still read and the stream stays in step.

    The timeout bounds silence, as pylibmc's poll timeout and pymemcache's socket timeout
    do: a call fails when nothing came from the node for ``timeout`` seconds since its
    request was sent, not when a long queue of replies is still flowing. Replies come in
    order, so only the oldest request can be late: one timer per connection watches it.
    """

    def __init__(self, channel: NodeChannel, sock: socket.socket) -> None:
        self._channel = channel
        self._sock = sock
        self._loop = channel.loop
        self._clock = loop_clock(channel.loop)
        self._timeout = channel.timeout
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self.pending: collections.deque[_Request] = collections.deque()
        """The requests on the wire, oldest first: their replies come in this order."""
        self._watchdog: asyncio.TimerHandle | None = None
        self._last_received = 0.0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def send(self, request: Request, parser: Parser) -> asyncio.Future[Any]:
        """
        ``call`` for one request, without a coroutine of its own: the request is written
        now, and the future of its reply is returned for the caller to await. A caller
        cancelled while awaiting it cancels the future and leaves its slot in the queue, as
        in ``call``.
        """
        if self.closed or self._transport is None:
            raise ConnectionClosed(f"connection to {self._channel.name} is closed")
        loop = self._loop
        sent = self._clock()
        future = loop.create_future()
        self.pending.append((parser, future, sent))
        if isinstance(request, tuple):
            self._transport.writelines(request)  # a large value's pieces, uncopied
        else:
            self._transport.write(request)
        if self._watchdog is None and self._timeout is not None:
            self._watchdog = loop.call_at(sent + self._timeout, self._check_deadline)
        return future

    async def call(self, requests: Sequence[Request], parser: Parser) -> list[Any]:
        """Send requests in one write; their replies (or ``ErrorReply``s), in order."""
        if self.closed or self._transport is None:
            raise ConnectionClosed(f"connection to {self._channel.name} is closed")
        loop = self._loop
        sent = self._clock()
        futures = [loop.create_future() for _ in requests]
        self.pending.extend((parser, future, sent) for future in futures)
        data = joined(requests)
        if data is None:
            self._transport.writelines(request_pieces(requests))  # a large value's, uncopied
        else:
            self._transport.write(data)
        if self._watchdog is None and self._timeout is not None:
            self._watchdog = loop.call_at(sent + self._timeout, self._check_deadline)
        return [await future for future in futures]

    def data_received(self, data: bytes) -> None:
        self._last_received = self._clock()
        buffer = self._buffer
        buffer += data
        position = replies = 0
        pending = self.pending
        try:
            while pending:
                parsed = pending[0][PARSER](buffer, position)
                if parsed is None:
                    break
                reply, position = parsed
                replies += 1
                future = pending.popleft()[FUTURE]
                if not future.done():
                    future.set_result(reply)
            if position < len(buffer) and not pending:
                raise ProtocolError(f"{self._channel.name} sent data nobody asked for")
        except ProtocolError as error:
            self.close(error)
            return
        del buffer[:position]
        if replies and self._channel.waiters:
            self._channel.slots_freed(replies)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"{self._channel.name} closed the connection"
        self.close(ConnectionClosed(f"{reason}: {exc}" if exc else reason))

    def close(self, error: Exception) -> None:
        """Close now; every request still waiting fails with ``error``."""
        if not self.closed:
            self.closed = True
            if self._watchdog is not None:
                self._watchdog.cancel()
            if self._transport is not None:
                self._transport.abort()
            self._channel.release_socket(self._sock)
            self._channel.forget(self)
        while self.pending:
            future = self.pending.popleft()[FUTURE]
            if not future.done():
                future.set_exception(error)
                # Marked retrieved: the caller may be gone (cancelled, or it raised on an
                # earlier request of its call), and asyncio would log each such future.
                future.exception()

    def close_socket(self) -> None:
        """Release the socket of a loop that is closed (its transport can no longer run)."""
        self.closed = True
        self._channel.release_socket(self._sock)

    def _check_deadline(self, after_reading: bool = False) -> None:
        self._watchdog = None
        if not self.pending or self._timeout is None:
            return
        deadline = max(self.pending[0][SENT], self._last_received) + self._timeout
        if deadline > self._clock():
            self._watchdog = self._loop.call_at(deadline, self._check_deadline)
            return
        if not after_reading:
            # A loop too busy to run this timer on time may not have read what already came:
            # look again once it has polled its sockets.
            self._watchdog = self._loop.call_later(0, self._check_deadline, True)
            return
        # The reply may still come, or never: the connection is out of step either way.
        self.close(TimeoutError(f"no reply from {self._channel.name} within {self._timeout} s"))


class NodeChannel:
    """
    The connections to one node on one loop: at most ``max_connections`` of them, each
    with at most ``max_in_flight`` requests; a caller that finds none free waits for one.
    """

    def __init__(
        self,
        node: ClusterNode,
        tls: ssl.SSLContext | None,
        connect_timeout: float | None,
        timeout: float | None,
        max_connections: int,
        max_in_flight: int,
        sockets: set[socket.socket],
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self._sockets = sockets
        self.node = node
        self.name = format_address(node.hostname or node.ip, node.port)
        self.timeout = timeout
        self._tls = tls
        self._connect_timeout = connect_timeout
        self._max_connections = max_connections
        self._max_in_flight = max_in_flight
        self._connections: list[NodeConnection] = []
        self._opening = 0
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        """Callers waiting for room on a connection, first come first served."""

    async def call(self, requests: Sequence[Request], parser: Parser) -> list[Any]:
        """The replies to ``requests``, sent together as far as a connection takes them."""
        depth = self._max_in_flight
        if len(requests) > depth:
            replies = []
            for start in range(0, len(requests), depth):
                replies += await self.call(requests[start : start + depth], parser)
            return replies
        for connection in self._connections:
            if len(connection.pending) < self._max_in_flight:
                break
        else:
            connection = await self._free_connection()
        return await connection.call(requests, parser)

    def send(self, request: Request, parser: Parser) -> asyncio.Future[Any] | None:
        """
        One request on a connection that has room for it now: the future of its reply.
        ``None`` when no connection has (none open, or all full): ``call`` then waits for
        one. The uncontended path of a single-key call, with no coroutine of its own.
        """
        for connection in self._connections:
            if len(connection.pending) < self._max_in_flight:
                return connection.send(request, parser)
        return None

    async def _free_connection(self) -> NodeConnection:
        while True:
            for connection in self._connections:
                if len(connection.pending) < self._max_in_flight:
                    return connection
            if len(self._connections) + self._opening < self._max_connections:
                return await self._open()
            waiter = self.loop.create_future()
            self.waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    # Woken, then cancelled before it ran: the slot it was given goes to
                    # the next waiter, or that one sleeps until some other reply comes.
                    self.slots_freed(1)
                raise

    async def _open(self) -> NodeConnection:
        self._opening += 1
        try:
            connection = await self._connect()
        except BaseException as error:
            # Whoever waited for this connection fails with it, as a queue behind a broken
            # connection would: one attempt per node, not one per waiting request.
            self._opening -= 1
            self._wake_all(error if isinstance(error, Exception) else None)
            raise
        self._opening -= 1
        self._connections.append(connection)
        self._wake_all()
        return connection

    async def _connect(self) -> NodeConnection:
        """
        Connect within ``connect_timeout``. As for replies, a loop too busy to notice the
        connection on time gets one more look after polling its sockets before giving up.
        """
        made: list[NodeConnection] = []
        attempt = self.loop.create_task(self._connect_unbounded(made))
        expired = False

        def expire(after_polling: bool) -> None:
            nonlocal expired
            if attempt.done():
                return
            if not after_polling:
                self.loop.call_later(0, expire, True)
                return
            expired = True
            attempt.cancel()

        timeout = self._connect_timeout
        timer = None if timeout is None else self.loop.call_later(timeout, expire, False)
        try:
            return await attempt
        except BaseException as error:
            # The attempt has ended (a task's cancellation waits for it), maybe with a
            # connection made just as the caller gave up: nobody will use it.
            for connection in made:
                connection.close(ConnectionClosed(f"connection to {self.name} abandoned"))
            if expired and isinstance(error, asyncio.CancelledError):
                message = f"could not connect to {self.name} within {timeout} s"
                raise TimeoutError(message) from None
            raise
        finally:
            if timer is not None:
                timer.cancel()

    async def _connect_unbounded(self, made: list[NodeConnection]) -> NodeConnection:
        """
        Connect, then (over TLS) shake hands. Once a transport holds the socket, only the
        transport closes it: a socket closed under a live transport leaves its descriptor
        registered with the loop, and the next socket to get that number is refused.
        """
        node = self.node
        if node.ip:  # Numeric: no resolver, no thread.
            addresses = socket.getaddrinfo(
                node.ip, node.port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
            )
        else:
            addresses = await self.loop.getaddrinfo(
                node.hostname, node.port, type=socket.SOCK_STREAM
            )
        family, kind, proto, _, address = addresses[0]
        sock = socket.socket(family, kind, proto)
        self._sockets.add(sock)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await self.loop.sock_connect(sock, address)
        except BaseException:
            self.release_socket(sock)
            raise
        connection = NodeConnection(self, sock)
        made.append(connection)
        transport, _ = await self.loop.create_connection(lambda: connection, sock=sock)
        if self._tls is not None:
            # Verified against the name the certificate carries, at the listed address.
            secured = await self.loop.start_tls(
                transport, connection, self._tls, server_hostname=node.hostname or node.ip
            )
            if secured is None:  # The transport closed during the handshake.
                raise ConnectionClosed(f"{self.name} closed the connection during the handshake")
            connection.connection_made(secured)
        return connection

    def release_socket(self, sock: socket.socket) -> None:
        sock.close()
        self._sockets.discard(sock)

    def slots_freed(self, count: int) -> None:
        """Replies came in: as many waiting callers may send."""
        while count and self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1

    def forget(self, connection: NodeConnection) -> None:
        if connection in self._connections:
            self._connections.remove(connection)
        self._wake_all()

    def close(self, error: Exception | None = None) -> None:
        """Close every connection; requests waiting on them fail with ``error``."""
        error = error or ConnectionClosed(f"connection to {self.name} closed")
        for connection in list(self._connections):
            connection.close(error)

    def close_sockets(self) -> None:
        for connection in self._connections:
            connection.close_socket()
        self._connections.clear()

    def _wake_all(self, error: Exception | None = None) -> None:
        waiters, self.waiters = self.waiters, collections.deque()
        for waiter in waiters:
            if not waiter.done():
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(error)


class LoopConnections:
    """
    Every channel of one event loop, keyed by the node's ``NodePool``.

    The loop owns this (an attribute of the loop) and the module knows it only weakly:
    a loop dropped without ``close()`` is collected with its connections, and a finalizer
    on the loop, which holds nothing but their sockets, closes those.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop_ref = weakref.ref(loop)
        self.channels: dict[NodePool, NodeChannel] = {}
        self.sockets: set[socket.socket] = set()
        self._close_at_shutdown = self._until_shutdown()
        self._close_sockets_when_collected = weakref.finalize(loop, _close_all, self.sockets)
        self._close_sockets_when_collected.atexit = False

    def watch_shutdown(self) -> None:
        """
        Start an async generator on the loop: the loop's shutdown (``shutdown_asyncgens``)
        closes it, and with it this loop's connections, while the loop can still run.
        """
        with contextlib.suppress(StopIteration):
            self._close_at_shutdown.asend(None).send(None)

    async def _until_shutdown(self) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            self.close()
            _forget(self)

    def close_channels(self, pools: Iterable[NodePool]) -> None:
        for pool in pools:
            channel = self.channels.pop(pool, None)
            if channel is not None:
                channel.close()

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()
        self.channels.clear()

    def release_closed(self) -> None:
        """
        The loop closed without shutting down its async generators: close the sockets
        directly, and finish the generator here, so that it never asks the closed loop to.
        """
        for channel in self.channels.values():
            channel.close_sockets()
        self.channels.clear()
        with contextlib.suppress(StopIteration):
            self._close_at_shutdown.aclose().send(None)

    def detach(self) -> None:
        """No longer the loop's: its next use of the cache starts afresh."""
        self._close_sockets_when_collected.detach()
        loop = self.loop_ref()
        if loop is not None and getattr(loop, _LOOP_ATTRIBUTE, None) is self:
            delattr(loop, _LOOP_ATTRIBUTE)


def _close_all(sockets: set[socket.socket]) -> None:
    for sock in sockets:
        sock.close()
    sockets.clear()


_LOOP_ATTRIBUTE = "_django_elasticache_connections"
_live: weakref.WeakSet[LoopConnections] = weakref.WeakSet()
_live_lock = threading.Lock()
_inherited_across_fork: list[LoopConnections] = []


def loop_connections() -> LoopConnections:
    """The running loop's connections, made on first use."""
    loop = asyncio.get_running_loop()
    state: LoopConnections | None = getattr(loop, _LOOP_ATTRIBUTE, None)
    if state is not None:
        return state
    with _live_lock:
        closed = _closed_loops()
        state = LoopConnections(loop)
        setattr(loop, _LOOP_ATTRIBUTE, state)
        _live.add(state)
    for stale in closed:
        stale.release_closed()
        stale.detach()
    state.watch_shutdown()
    return state


def _closed_loops() -> list[LoopConnections]:
    """Forget the loops closed without shutting down their async generators."""
    closed = []
    for state in list(_live):
        loop = state.loop_ref()
        if loop is None or loop.is_closed():
            _live.discard(state)
            closed.append(state)
    return closed


def _forget(state: LoopConnections) -> None:
    with _live_lock:
        _live.discard(state)
    state.detach()


def _after_fork_in_child() -> None:
    global _live_lock
    _live_lock = threading.Lock()
    # The parent still uses these sockets: keep them referenced, never close them here.
    for state in _live:
        state.detach()
    _inherited_across_fork.extend(_live)
    _live.clear()


forks.after_fork_in_child(_after_fork_in_child)


class AsyncClusterClient:
    """
    The memcached calls of Django's async cache API, over the nodes of a ``ClusterClient``,
    on the running loop: keys encoded and values (de)serialized by the library's rules,
    each key sent to the node its ``ClusterClient`` names, failures raised as the library
    raises them and counted in the node's health.
    """

    def __init__(
        self,
        adapter: LibraryAdapter,
        tls: ssl.SSLContext | None,
        max_connections: int,
        is_node_failure: Callable[[BaseException], bool],
    ) -> None:
        self._adapter = adapter
        self._tls = tls
        self._max_connections = max_connections
        self._is_node_failure = is_node_failure
        self._cluster_by_loop: weakref.WeakKeyDictionary[LoopConnections, ClusterClient] = (
            weakref.WeakKeyDictionary()
        )
        self._last_seen: tuple[Callable[[], LoopConnections | None], ClusterClient | None] = (
            lambda: None,
            None,
        )
        """
        The last loop (held weakly) and node list ``_channel`` saw, already recorded in
        ``_cluster_by_loop``: the common call skips that dictionary's lookup.
        """

    # Calls

    async def get(self, cluster: ClusterClient, key: str) -> Any:
        """The key's value, or ``MISSING``."""
        wire_key = self._wire_key(key)
        pool = cluster.pool_for(key)
        found = await self._call_one(cluster, pool, b"get " + wire_key + b"\r\n", parse_values)
        if wire_key not in found:
            if found:
                raise self._out_of_step(cluster, pool, found, {wire_key: key})
            return MISSING
        flags, data = found[wire_key]
        return self._adapter.deserialize(wire_key, data, flags)

    async def get_many(self, cluster: ClusterClient, keys: Iterable[str]) -> dict[str, Any]:
        wire_keys = {key: self._wire_key(key) for key in keys}

        async def get_from(pool: NodePool, node_keys: list[str]) -> dict[bytes, Any]:
            requests = [
                retrieval_request([wire_keys[key] for key in batch])
                for batch in cluster.get_batches(node_keys)
            ]
            found: dict[bytes, Any] = {}
            for batch_found in await self._call(cluster, pool, requests, parse_values):
                found.update(batch_found)
            return found

        by_pool = cluster.by_pool(wire_keys)
        keys_by_wire = {wire_key: key for key, wire_key in wire_keys.items()}
        values = {}
        results = await _each(get_from(pool, node_keys) for pool, node_keys in by_pool.items())
        for pool, found in zip(by_pool, results, strict=True):
            try:
                for wire_key, (flags, data) in found.items():
                    values[keys_by_wire[wire_key]] = self._adapter.deserialize(
                        wire_key, data, flags
                    )
            except KeyError:
                if key_not_asked_for(found, keys_by_wire) is None:
                    raise  # From the deserializer.
                raise self._out_of_step(cluster, pool, found, keys_by_wire) from None
        return values

    async def store(
        self, cluster: ClusterClient, command: bytes, data: dict[str, Any], exptime: int
    ) -> tuple[list[str], Exception | None]:
        """
        Store each key (``set`` or ``add``): the keys not stored, and the first failure of a
        node (``None`` if every node answered).

        With ``IGNORE_EXCEPTIONS``, ``aset_many`` returns these keys instead of raising, so
        they must be the keys a caller cannot count on: every node's part has ended before
        this returns (none writes after), a node that answered names the keys it refused,
        and a node whose part failed (connection lost, timeout) counts all of its keys as
        not stored. Which of those it applied before failing is unknowable (a request sent
        but unanswered may or may not have been); reporting them all is the only answer
        that never calls a key stored that is not. Keys on nodes that answered are never
        reported for another node's failure.
        """
        requests = {}
        for key, value in data.items():
            wire_key = self._wire_key(key)
            encoded, flags = self._adapter.serialize(wire_key, value)
            requests[key] = storage_request(command, wire_key, flags, exptime, encoded)
        await self._invalidate_former_owners(cluster, list(data))

        async def store_on(pool: NodePool, node_keys: list[str]) -> list[str]:
            node_requests = [requests[key] for key in node_keys]
            stored = await self._call(cluster, pool, node_requests, parse_stored)
            return [key for key, ok in zip(node_keys, stored, strict=True) if not ok]

        by_pool = cluster.by_pool(requests)
        outcomes = await _settle(store_on(pool, node_keys) for pool, node_keys in by_pool.items())
        not_stored: list[str] = []
        first_failure = None
        for node_keys, outcome in zip(by_pool.values(), outcomes, strict=True):
            if isinstance(outcome, Exception):
                not_stored += node_keys
                first_failure = first_failure or outcome
            else:
                not_stored += outcome
        return not_stored, first_failure

    async def delete(self, cluster: ClusterClient, keys: Sequence[str]) -> list[bool]:
        """Delete each key; whether each existed, in order."""
        await self._invalidate_former_owners(cluster, keys)
        return await self._delete(cluster, cluster.by_pool(keys))

    async def touch(self, cluster: ClusterClient, key: str, exptime: int) -> bool:
        request = touch_request(self._wire_key(key), exptime)
        touched = await self._call_one(cluster, cluster.pool_for(key), request, parse_touched)
        return bool(touched)

    async def counter(self, cluster: ClusterClient, key: str, delta: int) -> int | None:
        """Add ``delta`` (negative: subtract) to a counter; ``None`` for a missing key."""
        command, amount = (b"decr", -delta) if delta < 0 else (b"incr", delta)
        wire_key = self._wire_key(key)
        try:
            request = counter_request(command, wire_key, amount)
        except ValueError as error:
            # What memcached answers for such a delta, raised before sending it.
            refused = ClientErrorReply(f"invalid numeric delta argument: {error}")
            raise self._adapter.library_error(refused, "") from None
        value = await self._call_one(cluster, cluster.pool_for(key), request, parse_counter)
        return value

    async def flush_all(self, cluster: ClusterClient) -> None:
        """Flush every node, even after one failed; then raise the first failure."""
        await _each(
            self._call(cluster, pool, [flush_all_request()], parse_flushed)
            for pool in cluster.pools
        )

    # Internals

    def _wire_key(self, key: str) -> bytes:
        try:
            return check_key(self._adapter.encode_key(key))
        except IllegalKey as error:
            raise self._adapter.library_error(error, "") from None

    async def _call(
        self, cluster: ClusterClient, pool: NodePool, requests: Sequence[Request], parser: Parser
    ) -> list[Any]:
        pool.check_available()
        channel = self._channel(cluster, pool)
        try:
            replies = await channel.call(requests, parser)
        except (OSError, ProtocolError) as error:
            raise self._failed(pool, channel, error) from error
        pool.record_success()
        for reply in replies:
            if isinstance(reply, ErrorReply):
                raise self._adapter.library_error(reply, channel.name)
        return replies

    async def _call_one(
        self, cluster: ClusterClient, pool: NodePool, request: Request, parser: Parser
    ) -> Any:
        """
        ``_call`` for one request: its reply. On a connection with room for it, the reply's
        future is awaited here, two coroutines fewer per call than ``_call``.
        """
        pool.check_available()
        channel = self._channel(cluster, pool)
        try:
            future = channel.send(request, parser)
            if future is None:
                (reply,) = await channel.call([request], parser)
            else:
                reply = await future
        except (OSError, ProtocolError) as error:
            raise self._failed(pool, channel, error) from error
        pool.record_success()
        if isinstance(reply, ErrorReply):
            raise self._adapter.library_error(reply, channel.name)
        return reply

    def _failed(self, pool: NodePool, channel: NodeChannel, error: Exception) -> Exception:
        """The library's exception for a failed call, counted in the node's health."""
        translated = self._adapter.library_error(error, channel.name)
        if self._is_node_failure(translated):
            pool.record_failure()
        return translated

    def _out_of_step(
        self,
        cluster: ClusterClient,
        pool: NodePool,
        found: dict[bytes, Any],
        asked: dict[bytes, Any],
    ) -> Exception:
        """
        A reply held a key not asked for: it answered another request, the stream is out of
        step. Which of the node's connections on this loop read it is not known here: close
        them all (in clear text there is one), and raise the library's protocol error.
        """
        error = key_not_asked_for(found, asked)
        assert error is not None
        channel = self._channel(cluster, pool)
        channel.close(error)
        return self._adapter.library_error(error, channel.name)

    def _channel(self, cluster: ClusterClient, pool: NodePool) -> NodeChannel:
        # ``loop_connections()``'s common case written in: the loop has them already.
        connections = (
            getattr(asyncio.get_running_loop(), _LOOP_ATTRIBUTE, None) or loop_connections()
        )
        seen_last, cluster_last = self._last_seen
        if seen_last() is not connections or cluster_last is not cluster:
            seen = self._cluster_by_loop.get(connections)
            if seen is not cluster:
                if seen is not None:
                    # A new node list: close this loop's connections to the nodes that left it.
                    connections.close_channels(set(seen.pools) - set(cluster.pools))
                self._cluster_by_loop[connections] = cluster
            # One tuple, replaced whole: loops of other threads may replace it meanwhile.
            self._last_seen = (weakref.ref(connections), cluster)
        channel = connections.channels.get(pool)
        if channel is None:
            channel = connections.channels[pool] = NodeChannel(
                pool.node,
                self._tls,
                self._adapter.connect_timeout,
                self._adapter.timeout,
                max_connections=1 if self._tls is None else self._max_connections,
                max_in_flight=1 if self._tls is not None else PIPELINE_DEPTH,
                sockets=connections.sockets,
            )
        return channel

    async def _delete(
        self, cluster: ClusterClient, by_pool: dict[NodePool, list[str]]
    ) -> list[bool]:
        async def delete_on(pool: NodePool, node_keys: list[str]) -> list[bool]:
            requests = [delete_request(self._wire_key(key)) for key in node_keys]
            return await self._call(cluster, pool, requests, parse_deleted)

        results = await _each(delete_on(pool, node_keys) for pool, node_keys in by_pool.items())
        return [deleted for node_results in results for deleted in node_results]

    async def _invalidate_former_owners(self, cluster: ClusterClient, keys: Iterable[str]) -> None:
        stale = cluster.former_owners(keys)
        for pool, node_keys in stale.items():
            try:
                await self._delete(cluster, {pool: node_keys})
            except cluster.server_errors as error:  # As the sync path: only the node's failure.
                log_invalidation_failure(pool, len(node_keys), error)


async def _settle(calls: Iterable[Awaitable[Any]]) -> list[Any]:
    """
    Run one call per node, at once when there are several; each one's result or the
    ``Exception`` it raised, in order.

    Every call has ended when this returns or raises, so that none writes to a node after
    the caller was told the outcome: a failed call leaves the others to finish (each is
    bounded by the timeouts), and when the caller is cancelled (``Task.cancel``,
    ``wait_for``) the calls are cancelled and waited for before the cancellation goes on
    (``gather``'s cancellation waits for its children). A request already written keeps its
    place on its connection, whose reply is still read.
    """
    calls = list(calls)
    if len(calls) == 1:
        try:
            return [await calls[0]]
        except Exception as error:
            return [error]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
            raise outcome  # A part cancelled on its own: the batch was not done.
    return outcomes


async def _each(calls: Iterable[Awaitable[Any]]) -> list[Any]:
    """As ``_settle``, for calls that all must succeed: the first failure is raised."""
    outcomes = await _settle(calls)
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome
    return outcomes
