"""An in-process emulator of an ElastiCache memcached configuration endpoint.

A real configuration endpoint is a memcached node that also answers the Auto Discovery
commands with the list of nodes in the cluster. The emulator answers only those commands
(plus ``version`` and ``quit``), so tests can drive the discovery client through every
reply a real endpoint gives, and through the broken ones a flaky network produces.

With an ``ssl.SSLContext`` it speaks only TLS, like the endpoint of a cluster with
in-transit encryption.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import socketserver
import ssl
import threading
from collections.abc import Sequence

from ..cluster_utils import format_address
from .lifecycle import Startable

CRLF = b"\r\n"
CONFIG_COMMAND = ("config", "get", "cluster")
LEGACY_KEY = "AmazonElastiCache:cluster"
LEGACY_COMMAND = ("get", LEGACY_KEY)
# Engines before 1.4.14 only store the node list under LEGACY_KEY.
CONFIG_COMMAND_SINCE = (1, 4, 14)

# Replies of the misbehaviour modes that answer with a fixed line and keep the connection.
CANNED_REPLIES = {
    "error": b"ERROR\r\n",
    "client_error": b"CLIENT_ERROR bad command line format\r\n",
    "server_error": b"SERVER_ERROR out of memory\r\n",
    "end": b"END\r\n",
}
# What a misconfigured proxy or another service on the endpoint's port might send.
GARBAGE = b"\x00\xffHTTP/1.1 400 Bad Request\r\n\r\n"
MODES = (*CANNED_REPLIES, "hang", "close", "truncated", "garbage", "raw")

# Bounds that keep a forgotten endpoint from pinning threads forever.
IDLE_TIMEOUT = 300.0
# A client that connects but never completes the TLS handshake (plaintext clients, port
# scanners) holds its thread no longer than this; stop() ends it at once anyway.
HANDSHAKE_TIMEOUT = 5.0
HANG_TIMEOUT = 60.0
MAX_LINE = 4096
MAX_COMMANDS = 100_000  # per connection
JOIN_TIMEOUT = 5.0

Node = tuple[str, str, int]


def parse_engine_version(version: str) -> tuple[int, ...]:
    """Split "1.4.14" into (1, 4, 14), so versions compare numerically, not as text."""
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        raise ValueError(f"engine version must be dotted numbers, got {version!r}") from None


def config_payload(nodes: Sequence[Node], version: int) -> bytes:
    """Build the Auto Discovery payload: the config version, then the node list."""
    node_list = " ".join(f"{hostname}|{ip}|{port}" for hostname, ip, port in nodes)
    return f"{version}\n{node_list}\n".encode("ascii")


def config_reply(header: bytes, payload: bytes) -> bytes:
    """Frame a payload like memcached frames a value: header, flags, length, data, END."""
    return b"%s 0 %d\r\n%s\r\nEND\r\n" % (header, len(payload), payload)


class _Server(socketserver.ThreadingTCPServer):
    """A threading TCP server bound to an ephemeral port, IPv4 or IPv6 by host."""

    daemon_threads = True
    block_on_close = False
    # socketserver listens with a backlog of 5: a burst of clients discovering at once (a
    # wave of workers starting, a benchmark's 50 requests) would see SYNs dropped and
    # retried a second later, and time that as the endpoint's.
    request_queue_size = 128

    def __init__(self, host: str, endpoint: ConfigEndpoint, tls: ssl.SSLContext | None) -> None:
        # Instance attribute: TCPServer.__init__ reads it to create the socket.
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.endpoint = endpoint
        self.tls = tls
        super().__init__((host, 0), _ConnectionHandler)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection, wrapped for TLS but not yet handshaken.

        The handshake waits for the client, so it belongs to the connection's own thread
        (see _ConnectionHandler.handle), not to this one, which accepts for everyone.
        """
        connection, address = super().get_request()
        if self.tls is None:
            return connection, address
        try:
            wrapped = self.tls.wrap_socket(
                connection, server_side=True, do_handshake_on_connect=False
            )
        except BaseException:
            connection.close()
            raise
        return wrapped, address


class _ConnectionHandler(socketserver.StreamRequestHandler):
    """Serve one client connection: one reply per command line until the client leaves."""

    timeout = IDLE_TIMEOUT
    # Replies are small writes after reads; with Nagle's algorithm a TLS reply waits about
    # 40 ms behind the session tickets. A real endpoint answers at once.
    disable_nagle_algorithm = True
    server: _Server

    def handle(self) -> None:
        endpoint = self.server.endpoint
        if not endpoint._track(self.connection):
            return
        try:
            self._handshake()
            self._serve_lines(endpoint)
        except OSError:
            # The client went away, idled out, failed the TLS handshake (ssl.SSLError is
            # an OSError), or stop() closed the connection. Returning closes it.
            pass
        finally:
            endpoint._untrack(self.connection)

    def _handshake(self) -> None:
        """Complete the TLS handshake, if any, within HANDSHAKE_TIMEOUT."""
        if not isinstance(self.connection, ssl.SSLSocket):
            return
        self.connection.settimeout(HANDSHAKE_TIMEOUT)
        self.connection.do_handshake()
        self.connection.settimeout(self.timeout)

    def _serve_lines(self, endpoint: ConfigEndpoint) -> None:
        lines = iter(lambda: self.rfile.readline(MAX_LINE), b"")  # ends at EOF
        for line in itertools.islice(lines, MAX_COMMANDS):
            reply, keep_open = endpoint._respond(line.rstrip(b"\r\n").decode("utf-8", "replace"))
            self.connection.sendall(reply)
            if not keep_open:
                return


class ConfigEndpoint(Startable):
    """Emulate the configuration endpoint of an ElastiCache memcached cluster.

    It listens on an ephemeral port of a loopback host, advertises whatever node list
    publish() sets, and can be told to misbehave() so tests can watch how a discovery
    client copes with errors, hangs, and malformed replies.

    Given ``tls``, a server-side ``ssl.SSLContext`` holding the endpoint's certificate,
    every connection must open with a TLS handshake; one that does not is closed, so a
    plaintext client fails at once instead of waiting for a reply.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        engine_version: str = "1.6.18",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if tls is not None and not isinstance(tls, ssl.SSLContext):
            raise TypeError(f"tls must be an ssl.SSLContext or None, got {tls!r}")
        self._host = host
        self._tls = tls
        self._engine = parse_engine_version(engine_version)
        self._engine_version = engine_version
        self._lock = threading.Lock()
        # Wakes handlers parked in "hang" when behave() or stop() ends the hang.
        self._changed = threading.Condition(self._lock)
        self._nodes: tuple[Node, ...] = ()
        self._config_version = 0
        self._mode: str | None = None
        self._raw = b""
        self._discovery_requests = 0
        self._requests: list[str] = []
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._stopping = False
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None

    # Lifecycle

    def start(self) -> ConfigEndpoint:
        """Bind an ephemeral port and serve connections from daemon threads."""
        if self._server is not None:
            raise RuntimeError("ConfigEndpoint is already started")
        self._server = _Server(self._host, self, self._tls)
        self._serve_thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"ConfigEndpoint {self.location}",
            daemon=True,
        )
        self._serve_thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop every client connection, hung ones included."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
            connections = dict(self._connections)
        for connection in connections:
            # shutdown() wakes a handler blocked in recv; the handler closes the socket.
            _shutdown(connection)
        if self._server is not None and self._serve_thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._serve_thread.join(JOIN_TIMEOUT)
        for thread in connections.values():
            thread.join(JOIN_TIMEOUT)

    # Address

    @property
    def host(self) -> str:
        return self._host

    @property
    def tls(self) -> ssl.SSLContext | None:
        """The server-side TLS context, or None for a plaintext endpoint."""
        return self._tls

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("ConfigEndpoint is not started")
        return self._server.server_address[1]

    @property
    def location(self) -> str:
        """The endpoint as Django's LOCATION: "127.0.0.1:PORT" or "[::1]:PORT"."""
        return format_address(self._host, self.port)

    # What is advertised

    @property
    def engine_version(self) -> str:
        return self._engine_version

    @engine_version.setter
    def engine_version(self, version: str) -> None:
        engine = parse_engine_version(version)
        with self._lock:
            self._engine, self._engine_version = engine, version

    def publish(self, nodes: Sequence[Node], version: int) -> None:
        """Advertise (hostname, ip, port) nodes under a config version, both at once.

        Nodes are listed in hostname order, as ElastiCache does. The version is taken as
        given, even if it is lower than the last one, so tests can publish a stale config.
        """
        ordered = tuple(sorted(nodes, key=lambda node: node[0]))
        with self._lock:
            self._nodes, self._config_version = ordered, version

    @property
    def nodes(self) -> tuple[Node, ...]:
        with self._lock:
            return self._nodes

    @property
    def config_version(self) -> int:
        with self._lock:
            return self._config_version

    # Misbehaviour

    def misbehave(self, mode: str, raw: bytes | None = None) -> None:
        """Answer discovery commands wrongly from now on; see MODES for the choices.

        "hang" and "close" apply to every command, the others only to discovery commands.
        "raw" sends exactly ``raw`` and keeps the connection open.
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
        if (mode == "raw") != (raw is not None):
            raise ValueError('raw bytes are required by mode "raw" and only by it')
        with self._changed:
            self._mode, self._raw = mode, raw or b""
            self._changed.notify_all()

    def behave(self) -> None:
        """Answer correctly again; connections parked in "hang" get their reply now."""
        with self._changed:
            self._mode, self._raw = None, b""
            self._changed.notify_all()

    # Counting

    @property
    def discovery_requests(self) -> int:
        """How many discovery commands arrived, whatever the reply was."""
        with self._lock:
            return self._discovery_requests

    @property
    def requests(self) -> list[str]:
        """Every command line received, in order, without its line ending."""
        with self._lock:
            return list(self._requests)

    def reset_counts(self) -> None:
        with self._lock:
            self._discovery_requests = 0
            self._requests.clear()

    # Called from a relay in front of each node

    def reply_to(self, line: bytes) -> bytes | None:
        """What an ElastiCache node of this cluster answers itself, else None.

        Every node reports the cluster's engine version and answers the discovery
        commands like a healthy endpoint, whatever misbehave() set for the endpoint
        itself, and without counting. ``config get cluster`` on an engine that lacks it
        is left to memcached, which answers ``ERROR`` as such an engine does.
        """
        words = tuple(line.decode("utf-8", "replace").split())
        if words not in (CONFIG_COMMAND, LEGACY_COMMAND, ("version",)):
            return None
        with self._lock:
            reply = self._correct_reply(words)
        return None if reply == b"ERROR\r\n" else reply

    # Called from connection handler threads

    def _track(self, connection: socket.socket) -> bool:
        """Register a connection so stop() can close it; refuse it if stop() has begun."""
        with self._lock:
            if self._stopping:
                return False
            self._connections[connection] = threading.current_thread()
            return True

    def _untrack(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.pop(connection, None)

    def _respond(self, line: str) -> tuple[bytes, bool]:
        """Return the reply to one command line and whether to keep the connection open."""
        words = tuple(line.split())
        is_discovery = words in (CONFIG_COMMAND, LEGACY_COMMAND)
        with self._changed:
            self._requests.append(line)
            self._discovery_requests += is_discovery
            # Parked here, a hung request holds no lock and wakes on behave() or stop().
            self._changed.wait_for(
                lambda: self._mode != "hang" or self._stopping, timeout=HANG_TIMEOUT
            )
            if self._mode == "hang" or self._stopping:
                return b"", False
            mode, raw = self._mode, self._raw
            reply = self._correct_reply(words)
        if words == ("quit",) or mode == "close":
            return b"", False
        if not is_discovery or mode is None:
            return reply, True
        return self._misbehaviour_reply(mode, raw, reply)

    def _correct_reply(self, words: tuple[str, ...]) -> bytes:
        """What a healthy endpoint of this engine version answers; caller holds the lock."""
        if words == ("version",):
            return b"VERSION %s\r\n" % self._engine_version.encode("ascii")
        if words == CONFIG_COMMAND and self._engine >= CONFIG_COMMAND_SINCE:
            return config_reply(b"CONFIG cluster", self._payload())
        if words == LEGACY_COMMAND:
            return config_reply(b"VALUE " + LEGACY_KEY.encode("ascii"), self._payload())
        return b"ERROR\r\n"

    def _payload(self) -> bytes:
        return config_payload(self._nodes, self._config_version)

    @staticmethod
    def _misbehaviour_reply(mode: str, raw: bytes, correct: bytes) -> tuple[bytes, bool]:
        if mode in CANNED_REPLIES:
            return CANNED_REPLIES[mode], True
        if mode == "truncated":
            return correct[: len(correct) // 2], False
        if mode == "garbage":
            return GARBAGE, False
        return raw, True


def _shutdown(connection: socket.socket) -> None:
    # socket.socket's own shutdown: SSLSocket.shutdown() would also drop the TLS state
    # under the feet of the handler thread that is using it.
    with contextlib.suppress(OSError):  # Already closed by its handler.
        socket.socket.shutdown(connection, socket.SHUT_RDWR)
