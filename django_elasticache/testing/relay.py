"""A relay in front of memcached that answers a few commands itself, as ElastiCache does.

Every ElastiCache node answers ``config get cluster`` with the cluster's node list, and
ElastiCache Serverless refuses some commands stock memcached accepts. A relay front
listens where clients connect, forwards their bytes to a real memcached, and replies
itself to the command lines its ``Rules`` claim. Everything else reaches memcached
unchanged: values of any bytes (the relay follows data blocks, so a value that looks
like a command is never read as one), pipelined requests, noreply, the binary protocol
(a connection whose first byte is 0x80 is passed through untouched).

Replies stay in request order: before answering a claimed line, the relay sends
memcached a meta no-op carrying a random opaque token and answers only once memcached's
reply to it has come back, i.e. after every reply to what came before.

One thread per relay serves every front and connection with a selector. With TLS the
front terminates it (memcached behind it speaks plaintext on a private port).

A relay made with ``latency`` emulates a network: every byte it sends a client leaves
``latency`` seconds after the relay had it (the reply of memcached or of the rules), so a
request and its reply take ``latency`` longer than without. The bytes wait in a
``DelayLine``, in order, while the selector goes on serving every connection; an
``Alarm`` thread wakes the selector when they fall due, to the microsecond, where the
selector's own timeout is rounded up to whole milliseconds (epoll).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import queue
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol

from .processes import _prctl

# Big enough for any value memcached takes (1 MB by default) to move in few reads.
CHUNK = 256 * 1024
# Stop reading from one side while this much waits for the other side to accept it.
HIGH_WATER = 4 * 1024 * 1024
# A command line longer than this is forwarded in pieces and never claimed.
MAX_LINE = 1024 * 1024
HANDSHAKE_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0
SWEEP_INTERVAL = 0.5
JOIN_TIMEOUT = 5.0
STORAGE_COMMANDS = {b"set", b"add", b"replace", b"append", b"prepend", b"cas"}
BINARY_REQUEST_MAGIC = 0x80
PR_SET_TIMERSLACK = 29

Address = tuple[str, int]


class Rules(Protocol):
    """What a front answers itself."""

    def reply_to(self, line: bytes) -> bytes | None:
        """The reply to a command line (without its line ending), or None to forward it."""


def data_length(words: list[bytes]) -> int:
    """How many bytes of data (CRLF included) follow this command line; 0 if none.

    Storage commands carry ``<bytes>`` as their fifth word, meta set (``ms <key>
    <datalen>``) as its third. A length memcached would refuse has no data block either.
    """
    if not words:
        return 0
    if words[0] in STORAGE_COMMANDS:
        position = 4
    elif words[0] == b"ms":
        position = 2
    else:
        return 0
    if len(words) <= position or not words[position].isdigit():
        return 0
    return int(words[position]) + 2


def check_latency(latency: object) -> float:
    """A latency in seconds as a float: a finite number of seconds, 0 or more."""
    if isinstance(latency, bool) or not isinstance(latency, (int, float)):
        raise TypeError(f"latency must be a number of seconds, got {latency!r}")
    if not math.isfinite(latency) or latency < 0:
        raise ValueError(f"latency must be a finite number of seconds >= 0, got {latency!r}")
    return float(latency)


class DelayLine:
    """Bytes on their way to clients, each released ``latency`` seconds after it was sent.

    One queue for every connection of a relay, in the order the bytes were sent: with one
    latency for all, that is also the order they fall due. So a connection's bytes never
    overtake one another, and no connection waits for another's: each chunk waits only
    for its own due time.
    """

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self._queue: deque[tuple[float, _Connection, bytes]] = deque()

    def send(self, connection: _Connection, data: bytes | bytearray) -> None:
        self._queue.append((time.monotonic() + self.latency, connection, bytes(data)))
        connection.in_flight += len(data)

    def next_due(self) -> float | None:
        return self._queue[0][0] if self._queue else None

    def deliver(self, now: float) -> set[_Connection]:
        """Hand every chunk due by now to its connection; the connections that got one."""
        delivered = set()
        while self._queue and self._queue[0][0] <= now:
            _, connection, data = self._queue.popleft()
            connection.in_flight -= len(data)
            connection.to_client += data
            delivered.add(connection)
        return delivered


class Alarm:
    """A thread that wakes the relay's selector at a set time.

    The selector cannot: epoll rounds its timeout up to whole milliseconds, which would
    turn a latency of 0.3 ms into 1 ms. A condition wait is precise to microseconds once
    the thread asks Linux not to defer its timers (by 50 us by default) to save power.
    """

    def __init__(self, ring: Callable[[], None], name: str) -> None:
        self._ring = ring
        self._at: float | None = None
        self._stopped = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def set(self, at: float) -> None:
        """Ring at this monotonic time, unless already set to ring earlier."""
        with self._changed:
            if self._at is None or at < self._at:
                self._at = at
                self._changed.notify()

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify()
        if self._thread.is_alive():
            self._thread.join(JOIN_TIMEOUT)

    def _run(self) -> None:
        if _prctl is not None:
            _prctl(PR_SET_TIMERSLACK, 1, 0, 0)  # nanoseconds, this thread only
        with self._changed:
            while not self._stopped:
                if self._at is None:
                    self._changed.wait()
                    continue
                remaining = self._at - time.monotonic()
                if remaining > 0:
                    self._changed.wait(remaining)
                    continue
                self._at = None
                self._ring()


class _Connection:
    """One client connection and its connection to memcached, with what each side owes."""

    def __init__(
        self,
        front: Front,
        client: socket.socket,
        upstream: socket.socket,
        delay: DelayLine | None,
    ) -> None:
        self.front = front
        self.client = client
        self.upstream = upstream
        self.delay = delay
        self.accepted = time.monotonic()
        self.connected = False  # to the server behind the front
        self.handshaken = not isinstance(client, ssl.SSLSocket)
        self.handshake_wants = selectors.EVENT_READ
        self.inbox = bytearray()  # from the client, not yet parsed
        self.to_upstream = bytearray()
        self.to_client = bytearray()  # due: to send the client now
        self.in_flight = 0  # bytes for the client still in the delay line
        self.held = b""  # from memcached while waiting for the sync token
        self.data_left = 0
        # Passed through untouched, never parsed: the binary protocol, or a front without
        # rules (whose client may speak TLS to what is behind it).
        self.opaque = front.rules is None
        self.started = False
        self.in_long_line = False
        self.forwarded = False  # memcached may still owe replies
        self.token: bytes | None = None
        self.pending_reply = b""
        self.client_eof = False
        self.upstream_eof = False
        # What the selector watches for on each side.
        self.client_events = 0
        self.upstream_events = 0

    # Parsing the client's stream

    def parse(self) -> None:
        """Move what can be decided of the client's bytes on; keep an unfinished line.

        Works along an offset and cuts the buffer once: a pipeline of thousands of
        commands in one read must not copy the rest of the buffer per command.
        """
        position = 0
        while position < len(self.inbox) and self.token is None:
            if not self.started:
                self.started = True
                self.opaque |= self.inbox[0] == BINARY_REQUEST_MAGIC
            if self.opaque:
                self._forward(self.inbox[position:])
                position = len(self.inbox)
            elif self.data_left:
                chunk = self.inbox[position : position + self.data_left]
                position += len(chunk)
                self.data_left -= len(chunk)
                self._forward(chunk)
            else:
                end = self.inbox.find(b"\n", position)
                if end < 0:
                    if len(self.inbox) - position > MAX_LINE:  # forwarded, never claimed
                        self._forward(self.inbox[position:])
                        position, self.in_long_line = len(self.inbox), True
                    break
                self._take_line(bytes(self.inbox[position : end + 1]))
                position = end + 1
        del self.inbox[:position]

    def _take_line(self, line: bytes) -> None:
        if self.in_long_line:
            self.in_long_line = False
            self._forward(line)
            return
        assert self.front.rules is not None  # else the connection is opaque
        reply = self.front.rules.reply_to(line.rstrip(b"\r\n"))
        if reply is None:
            self._forward(line)
            self.data_left = data_length(line.split())
        elif self.forwarded:
            self._sync(reply)
        else:
            self._reply(reply)

    def _reply(self, data: bytes | bytearray) -> None:
        """Send the client bytes, through the delay line if the relay has one."""
        if self.delay is None:
            self.to_client += data
        else:
            self.delay.send(self, data)

    def _forward(self, data: bytes | bytearray) -> None:
        self.to_upstream += data
        self.forwarded = True

    def _sync(self, reply: bytes) -> None:
        """Hold the reply until memcached has answered everything sent before it."""
        token = os.urandom(8).hex().encode()
        self.to_upstream += b"mg relay-sync O%s\r\n" % token
        self.token, self.pending_reply = b" O%s\r\n" % token, reply

    # memcached's stream

    def from_upstream(self, data: bytes) -> None:
        if self.token is None:
            self._reply(data)
            return
        self.held += data
        found = self.held.find(self.token)
        if found < 0:
            keep = len(self.token) + 2  # the token line's "EN"/"HD" and the token itself
            self._reply(self.held[:-keep])
            self.held = self.held[-keep:]
            return
        line_start = self.held.rfind(b"\n", 0, found) + 1
        after = self.held[found + len(self.token) :]
        self._reply(self.held[:line_start] + self.pending_reply + after)
        self.held, self.token, self.pending_reply, self.forwarded = b"", None, b"", False
        self.parse()

    # Interest for the selector

    def wants_client(self) -> int:
        if not self.handshaken:
            return self.handshake_wants
        events = selectors.EVENT_WRITE if self.to_client else 0
        if not self.client_eof and len(self.inbox) + len(self.to_upstream) < HIGH_WATER:
            events |= selectors.EVENT_READ
        return events

    def wants_upstream(self) -> int:
        if not self.connected:
            return selectors.EVENT_WRITE  # the connection's outcome
        events = selectors.EVENT_WRITE if self.to_upstream else 0
        if not self.upstream_eof and len(self.to_client) + self.in_flight < HIGH_WATER:
            events |= selectors.EVENT_READ
        return events

    @property
    def finished(self) -> bool:
        """Nothing more can move: memcached is gone and the client has all it will get."""
        return self.upstream_eof and not self.to_client and not self.in_flight


class Front:
    """A listening address whose connections a relay forwards to one server (memcached,
    or the configuration endpoint with no rules)."""

    def __init__(
        self,
        listener: socket.socket,
        backend: Address,
        tls: ssl.SSLContext | None,
        rules: Rules | None,
    ) -> None:
        self.listener = listener
        self.backend = backend
        self.tls = tls
        self.rules = rules
        self.connections: set[_Connection] = set()

    @property
    def address(self) -> Address:
        host, port = self.listener.getsockname()[:2]
        return host, port


def listen(address: Address) -> socket.socket:
    """A listening socket on address; OSError (EADDRINUSE...) if it cannot be had."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(128)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return listener


def _start_connecting(address: Address) -> socket.socket:
    """A non-blocking socket connecting to address: the relay's loop must not wait for a
    server that is slow to accept (a full listen backlog) while it serves every other."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    error = sock.connect_ex(address)
    if error not in (0, errno.EINPROGRESS):
        sock.close()
        raise OSError(error, os.strerror(error))
    return sock


class Relay:
    """The selector thread that serves every front of one cluster.

    ``latency``: seconds every reply waits before it leaves for the client (see above).
    """

    def __init__(self, name: str = "relay", latency: float = 0.0) -> None:
        self._name = name
        self._delay = DelayLine(check_latency(latency)) if latency else None
        self._alarm = Alarm(self._wake, f"{name} alarm")
        self._selector = selectors.DefaultSelector()
        self._calls: queue.SimpleQueue[tuple[Callable[[], object], Future[object]]] = (
            queue.SimpleQueue()
        )
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._thread: threading.Thread | None = None
        self._running = False
        self._connections: set[_Connection] = set()

    def start(self) -> Relay:
        if self._thread is None:
            self._running = True
            self._selector.register(self._wake_reader, selectors.EVENT_READ, None)
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()
            if self._delay is not None:
                self._alarm.start()
        return self

    @property
    def latency(self) -> float:
        return 0.0 if self._delay is None else self._delay.latency

    def stop(self) -> None:
        """Close every front and connection and end the thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            self._call(self._shut_down)
            self._thread.join(JOIN_TIMEOUT)
        self._alarm.stop()
        self._wake_reader.close()
        self._wake_writer.close()

    def open(
        self,
        address: Address,
        backend: Address,
        tls: ssl.SSLContext | None,
        rules: Rules | None,
    ) -> Front:
        """Listen on address (raises OSError if taken) and relay to backend from now on.

        Without rules, every byte passes through unparsed, both ways.
        """
        front = Front(listen(address), backend, tls, rules)
        try:
            self._call(lambda: self._register(front.listener, selectors.EVENT_READ, front))
        except BaseException:
            front.listener.close()
            raise
        return front

    def close(self, front: Front) -> None:
        """Stop listening and drop the front's connections, as a dead node would."""
        self._call(lambda: self._close_front(front))

    # Running in the relay's thread

    def _register(self, sock: socket.socket, events: int, data: object) -> None:
        self._selector.register(sock, events, data)

    def _call(self, function: Callable[[], object]) -> object:
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError(f"{self._name} is not running")
        future: Future[object] = Future()
        self._calls.put((function, future))
        self._wake()
        return future.result(JOIN_TIMEOUT)

    def _wake(self) -> None:
        """Make the selector return (from any thread)."""
        with contextlib.suppress(BlockingIOError, OSError):  # already woken, or closed
            self._wake_writer.send(b"\0")

    def _loop(self) -> None:
        last_sweep = time.monotonic()
        while self._running:
            for key, events in self._selector.select(SWEEP_INTERVAL):
                self._dispatch(key, events)
            if self._delay is not None:
                self._deliver(self._delay)
            if time.monotonic() - last_sweep >= SWEEP_INTERVAL:
                last_sweep = time.monotonic()
                self._sweep_stalled()
        self._selector.close()

    def _dispatch(self, key: selectors.SelectorKey, events: int) -> None:
        if key.data is None:
            self._run_calls()
        elif isinstance(key.data, Front):
            self._accept(key.data)
        else:
            connection, side = key.data
            if connection in self._connections:
                self._service(connection, side, events)

    def _deliver(self, delay: DelayLine) -> None:
        """Send clients the bytes now due, and set the alarm for the next ones."""
        for connection in delay.deliver(time.monotonic()):
            if connection in self._connections:
                self._service(connection, "delivery", 0)
        due = delay.next_due()
        if due is not None:
            self._alarm.set(due)

    def _run_calls(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_reader.recv(4096)
        while True:
            try:
                function, future = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(function())
            except BaseException as exc:
                future.set_exception(exc)

    def _shut_down(self) -> None:
        for key in list(self._selector.get_map().values()):
            if isinstance(key.data, Front):
                self._close_front(key.data)
        self._running = False

    def _close_front(self, front: Front) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(front.listener)
        front.listener.close()
        for connection in list(front.connections):
            self._drop(connection)

    def _accept(self, front: Front) -> None:
        try:
            client, _ = front.listener.accept()
        except OSError:  # nothing to accept after all, or the front was just closed
            return
        try:
            upstream = _start_connecting(front.backend)
        except OSError:
            client.close()  # memcached is gone: the node looks dead
            return
        client.setblocking(False)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if front.tls is not None:
            client = front.tls.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        connection = _Connection(front, client, upstream, self._delay)
        front.connections.add(connection)
        self._connections.add(connection)
        connection.client_events = connection.wants_client()
        connection.upstream_events = connection.wants_upstream()
        self._selector.register(client, connection.client_events, (connection, "client"))
        self._selector.register(upstream, connection.upstream_events, (connection, "upstream"))

    def _service(self, connection: _Connection, side: str, events: int) -> None:
        try:
            if side == "client":
                self._service_client(connection, events)
            elif side == "upstream":
                self._service_upstream(connection, events)
            elif connection.handshaken:  # "delivery": bytes came out of the delay line
                self._flush(connection)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
        except OSError:  # ssl.SSLError included: a reset, a failed handshake
            self._drop(connection)
            return
        if connection.finished:
            self._drop(connection)
            return
        self._watch(connection)

    def _watch(self, connection: _Connection) -> None:
        """Tell the selector what each side now waits for, if that changed (a syscall)."""
        client_events, upstream_events = connection.wants_client(), connection.wants_upstream()
        if client_events != connection.client_events:
            self._selector.modify(connection.client, client_events, (connection, "client"))
            connection.client_events = client_events
        if upstream_events != connection.upstream_events:
            self._selector.modify(connection.upstream, upstream_events, (connection, "upstream"))
            connection.upstream_events = upstream_events

    def _service_client(self, connection: _Connection, events: int) -> None:
        if not connection.handshaken:
            self._handshake(connection)
            events |= selectors.EVENT_READ  # the first commands may have come with it
        if events & selectors.EVENT_READ:
            self._read_client(connection)
        self._flush(connection)

    @staticmethod
    def _handshake(connection: _Connection) -> None:
        client = connection.client
        assert isinstance(client, ssl.SSLSocket)
        try:
            client.do_handshake()
        except ssl.SSLWantWriteError:
            connection.handshake_wants = selectors.EVENT_WRITE
            raise
        except ssl.SSLWantReadError:
            connection.handshake_wants = selectors.EVENT_READ
            raise
        connection.handshaken = True

    def _read_client(self, connection: _Connection) -> None:
        while True:  # TLS may hold decrypted bytes the selector cannot see
            try:
                data = connection.client.recv(CHUNK)
            except (BlockingIOError, ssl.SSLWantReadError):
                break
            if not data:
                connection.client_eof = True
                break
            connection.inbox += data
            if not isinstance(connection.client, ssl.SSLSocket) or not connection.client.pending():
                break
        connection.parse()

    def _service_upstream(self, connection: _Connection, events: int) -> None:
        if not connection.connected:
            error = connection.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, os.strerror(error))  # the node looks dead
            connection.connected = True
        if events & selectors.EVENT_READ:
            try:
                data = connection.upstream.recv(CHUNK)
            except BlockingIOError:
                data = None
            if data == b"":
                connection.upstream_eof = True
            elif data:
                connection.from_upstream(data)
        if connection.handshaken:
            client = connection.client
            leftover = isinstance(client, ssl.SSLSocket) and client.pending()
            if leftover and connection.wants_client() & selectors.EVENT_READ:
                self._read_client(connection)  # decrypted bytes left behind at high water
            self._flush(connection)

    @staticmethod
    def _flush(connection: _Connection) -> None:
        """Send what each side can take now; the selector calls again for the rest."""
        if connection.to_upstream and connection.connected:
            with contextlib.suppress(BlockingIOError):
                sent = connection.upstream.send(connection.to_upstream)
                del connection.to_upstream[:sent]
        if connection.to_client:
            with contextlib.suppress(BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                sent = connection.client.send(connection.to_client)
                del connection.to_client[:sent]
        done_sending = connection.client_eof and connection.token is None and connection.connected
        if done_sending and not connection.to_upstream and not connection.upstream_eof:
            # The client is done sending; memcached answers what it got, then closes.
            with contextlib.suppress(OSError):
                connection.upstream.shutdown(socket.SHUT_WR)

    def _sweep_stalled(self) -> None:
        """Drop clients that never complete the TLS handshake, and those whose server
        behind the front never accepts the relay's connection."""
        now = time.monotonic()
        for connection in list(self._connections):
            handshake_over = connection.accepted < now - HANDSHAKE_TIMEOUT
            connect_over = connection.accepted < now - CONNECT_TIMEOUT
            if (not connection.handshaken and handshake_over) or (
                not connection.connected and connect_over
            ):
                self._drop(connection)

    def _drop(self, connection: _Connection) -> None:
        self._connections.discard(connection)
        connection.front.connections.discard(connection)
        for sock in (connection.client, connection.upstream):
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            with contextlib.suppress(OSError):
                # socket.socket's own shutdown: an SSLSocket's would try a TLS goodbye.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            sock.close()
