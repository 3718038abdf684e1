"""
The ElastiCache auto discovery protocol: one configuration endpoint, bytes in, node list out.

A configuration endpoint is a memcached-speaking server that answers ``config get cluster``
(engines 1.4.14 and later) or ``get AmazonElastiCache:cluster`` (older engines) with the
cluster's current node list::

    CONFIG cluster 0 136\\r\\n
    12\\n
    host-1|10.82.235.120|11211 host-2|10.80.249.27|11211\\n
    \\r\\n
    END\\r\\n

This module opens one connection, asks, parses and closes. It knows nothing about Django,
client libraries or caching of results: see ``topology`` for that. Every step runs under one
deadline, so a silent or slow endpoint costs at most ``timeout`` seconds, and every failure is
a ``ClusterDiscoveryError`` that names the endpoint and shows what it sent.

Every ElastiCache node answers the discovery commands too, not only the configuration
endpoint; ``discover_from_nodes`` asks known nodes when the endpoint cannot be reached.
A serverless cache has one endpoint and no discovery at all: ``is_serverless_host`` tells
one by its name.
"""

from __future__ import annotations

import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "DEFAULT_TIMEOUT",
    "ClusterConfig",
    "ClusterDiscoveryError",
    "ClusterNode",
    "DiscoveryNotSupported",
    "EndpointTLSError",
    "EndpointTimeout",
    "EndpointUnreachable",
    "NodesUnreachable",
    "WrongProtocolData",
    "ask_version",
    "discover",
    "discover_from_nodes",
    "format_address",
    "get_cluster_info",
    "is_serverless_host",
    "parse_cluster_config",
    "parse_engine_version",
]

DEFAULT_TIMEOUT = 2.0
"""Seconds that one discovery (resolve, connect, both requests, all replies) may take."""

CONFIG_COMMAND = b"config get cluster\r\n"
LEGACY_COMMAND = b"get AmazonElastiCache:cluster\r\n"
FIRST_ENGINE_WITH_CONFIG_COMMAND = (1, 4, 14)
MAX_REPLY_BYTES = 1 << 20

MAX_CONFIG_VERSION = 2**63 - 1
"""
The largest config version taken from a reply. The version counts the cluster's node
changes from 1, and AWS's clients hold it in a 64-bit integer at most; a larger number can
only come from a corrupt or hostile reply, and taking it would make every later, genuine
version look stale.
"""

MAX_NODES = 1000
"""
The most nodes a reply may list. An ElastiCache memcached cluster has at most 60 nodes by
default and quota raises stay in the hundreds; a longer list is corrupt, and would make
every client open a connection to each entry.
"""

MAX_NODES_ASKED = 3
"""How many known nodes ``discover_from_nodes`` tries, as AWS's Java client does."""

_END = b"\r\nEND\r\n"
_ERROR_PREFIXES = (b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR")
_ENGINE_VERSION = re.compile(rb"VERSION (\d+)\.(\d+)\.(\d+)")
_HEADER = re.compile(rb"(?:CONFIG cluster|VALUE AmazonElastiCache:cluster) (\d+) (\d+)")
_SERVERLESS_HOST = re.compile(
    r"[a-z0-9-]+\.serverless\.[a-z0-9-]+\.cache\.amazonaws\.com(?:\.cn)?\.?", re.IGNORECASE
)


class ClusterDiscoveryError(Exception):
    """
    The configuration endpoint did not produce a usable node list.

    ``endpoint`` is the ``host:port`` that was asked and ``received`` the bytes it sent, so
    a log line is enough to tell a wrong LOCATION from a misbehaving server.
    """

    def __init__(self, endpoint: str, problem: str, received: bytes = b"") -> None:
        self.endpoint = endpoint
        self.problem = problem
        self.received = received
        message = f"Cluster discovery at {endpoint} failed: {problem}"
        if received:
            message += f"; received {_preview(received)}"
        super().__init__(message)


class EndpointUnreachable(ClusterDiscoveryError):
    """The endpoint's name did not resolve or the connection was refused or reset."""


class EndpointTimeout(ClusterDiscoveryError):
    """The endpoint did not complete its answer within the discovery timeout."""


class EndpointTLSError(ClusterDiscoveryError):
    """
    The TLS handshake failed: the certificate did not verify (wrong CA, wrong name), or the
    endpoint does not speak TLS. Never retried in clear text.
    """


class WrongProtocolData(ClusterDiscoveryError):
    """The endpoint answered, but not with a cluster configuration."""


class DiscoveryNotSupported(WrongProtocolData):
    """
    The endpoint answered ``ERROR``: it is a plain memcached (or a serverless cache), which
    has no cluster configuration to give. ``IGNORE_CLUSTER_ERRORS`` exists for this case.
    """


class NodesUnreachable(ClusterDiscoveryError):
    """None of the known nodes asked by ``discover_from_nodes`` gave a node list."""


@dataclass(frozen=True)
class ClusterNode:
    """One cache node as the configuration endpoint lists it."""

    hostname: str
    ip: str
    port: int

    @property
    def address(self) -> str:
        """The ``host:port`` to connect to: the IP when listed, else the hostname."""
        return format_address(self.ip or self.hostname, self.port)


@dataclass(frozen=True)
class ClusterConfig:
    """
    A cluster's node list and the config version that grows with every change to it.

    ``serverless`` marks the one-node list of an ElastiCache Serverless cache: its endpoint
    is the only server there is, and there is nothing to discover or refresh.
    """

    version: int
    nodes: tuple[ClusterNode, ...]
    serverless: bool = False

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(node.address for node in self.nodes)


def is_serverless_host(host: str) -> bool:
    """
    Whether ``host`` names an ElastiCache Serverless cache
    (``<name>.serverless.<region>.cache.amazonaws.com``), which has no auto discovery.
    """
    return _SERVERLESS_HOST.fullmatch(host) is not None


def format_address(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals bracketed as client libraries expect."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_engine_version(line: bytes) -> tuple[int, int, int]:
    """
    Read ``(major, minor, patch)`` from a ``VERSION`` reply line.

    Distribution builds append text (``1.4.14 (Ubuntu)``, ``1.4.34-1ubuntu1``); only the
    three leading numbers decide which discovery command the engine understands.
    """
    match = _ENGINE_VERSION.match(line)
    if match is None:
        raise ValueError(f"not a memcached VERSION line: {_preview(line)}")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def parse_cluster_config(reply: bytes) -> ClusterConfig:
    """
    Parse a complete reply to ``config get cluster`` or the legacy ``get``.

    Raises ``ValueError`` naming the first part that breaks the grammar, or a version above
    ``MAX_CONFIG_VERSION``, more than ``MAX_NODES`` nodes, or a node listed twice. The byte
    count in the header is not checked against the payload: AWS's own documentation prints
    147 for a 136-byte payload, and the ``\\r\\nEND\\r\\n`` terminator already marks the
    payload's end.
    """
    header, separator, rest = reply.partition(b"\r\n")
    if not separator:
        raise ValueError("no header line")
    if _HEADER.fullmatch(header) is None:
        raise ValueError(f"unexpected header {_preview(header)}")
    if not rest.endswith(_END):
        raise ValueError("reply does not end with END")
    payload = rest[: -len(_END)]
    lines = payload.split(b"\n")
    if len(lines) != 3 or lines[2]:
        raise ValueError(f"payload is not two newline-terminated lines: {_preview(payload)}")
    version_line, nodes_line = lines[0], lines[1]
    if not version_line.isdigit():
        raise ValueError(f"config version is not a number: {_preview(version_line)}")
    if len(version_line) > len(str(MAX_CONFIG_VERSION)) or int(version_line) > MAX_CONFIG_VERSION:
        raise ValueError(f"config version is above 2**63 - 1: {_preview(version_line)}")
    items = [item for item in nodes_line.split(b" ") if item]
    if not items:
        raise ValueError("node list is empty")
    if len(items) > MAX_NODES:
        raise ValueError(f"{len(items)} nodes listed, more than the {MAX_NODES} accepted")
    nodes = tuple(_parse_node(item) for item in items)
    _refuse_repeated_nodes(nodes)
    return ClusterConfig(version=int(version_line), nodes=nodes)


def _refuse_repeated_nodes(nodes: tuple[ClusterNode, ...]) -> None:
    """
    A node is one hostname and port (what AWS's clients place keys by) and one address to
    connect to; either listed twice would give one server two shares of the keys.
    """
    names: set[tuple[str, int]] = set()
    addresses: set[str] = set()
    for node in nodes:
        name = (node.hostname or node.ip, node.port)
        if name in names or node.address in addresses:
            raise ValueError(f"node listed twice: {node.hostname}|{node.ip}|{node.port}")
        names.add(name)
        addresses.add(node.address)


def _parse_node(item: bytes) -> ClusterNode:
    parts = item.split(b"|")
    if len(parts) != 3:
        raise ValueError(f"node is not hostname|ip|port: {_preview(item)}")
    hostname, ip, port = (part.decode("ascii", "replace") for part in parts)
    if not (hostname or ip):
        raise ValueError(f"node has neither hostname nor ip: {_preview(item)}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"node port is not in 1-65535: {_preview(item)}")
    return ClusterNode(hostname=hostname, ip=ip, port=int(port))


def discover(
    host: str,
    port: int,
    timeout: float = DEFAULT_TIMEOUT,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> ClusterConfig:
    """
    Ask the configuration endpoint (or any node) at ``host:port`` for the cluster's nodes.

    One deadline covers name resolution, connecting, the TLS handshake (with ``tls``, the
    certificate is verified against ``server_hostname``, by default ``host``) and every
    read, so this returns or raises a ``ClusterDiscoveryError`` within about ``timeout``
    seconds whatever the server does. The connection is closed before returning.
    """
    endpoint = format_address(host, port)
    deadline = time.monotonic() + timeout
    with _connect(endpoint, host, port, deadline, tls, server_hostname or host) as conn:
        conn.send(b"version\r\n")
        version_line = conn.read_line()
        try:
            engine_version = parse_engine_version(version_line)
        except ValueError as exc:
            raise WrongProtocolData(endpoint, str(exc), version_line) from None
        if engine_version >= FIRST_ENGINE_WITH_CONFIG_COMMAND:
            conn.send(CONFIG_COMMAND)
        else:
            conn.send(LEGACY_COMMAND)
        reply = conn.read_reply()
    try:
        return parse_cluster_config(reply)
    except ValueError as exc:
        raise WrongProtocolData(endpoint, str(exc), reply) from None


def discover_from_nodes(
    nodes: Sequence[ClusterNode],
    timeout: float = DEFAULT_TIMEOUT,
    tls: ssl.SSLContext | None = None,
    *,
    ask: Callable[..., ClusterConfig] = discover,
) -> ClusterConfig:
    """
    Ask cluster nodes, rather than the configuration endpoint, for the node list.

    Every ElastiCache node answers the discovery commands, so when the endpoint cannot be
    reached the nodes already known still tell about a scale-out. Up to
    ``MAX_NODES_ASKED`` nodes, picked at random so that one dead node does not always go
    first, are asked in turn until one answers; all of them together within ``timeout``,
    each getting an equal share of what is left. With ``tls``, each node's certificate is
    verified against its hostname. ``ask`` is the discovery of one server (``discover``).
    """
    if not nodes:
        raise ValueError("no nodes to ask")
    chosen = random.sample(list(nodes), min(len(nodes), MAX_NODES_ASKED))
    deadline = time.monotonic() + timeout
    failures = []
    for position, node in enumerate(chosen):
        share = (deadline - time.monotonic()) / (len(chosen) - position)
        if share <= 0:
            failures.append(f"{node.address}: not asked, the timeout was spent")
            continue
        try:
            return ask(node.ip or node.hostname, node.port, share, tls, node.hostname or None)
        except ClusterDiscoveryError as exc:
            failures.append(f"{node.address}: {exc.problem}")
    raise NodesUnreachable(
        ", ".join(node.address for node in chosen), "no node answered: " + "; ".join(failures)
    )


def ask_version(
    host: str,
    port: int,
    timeout: float = DEFAULT_TIMEOUT,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> str:
    """
    The ``VERSION`` a memcached server (a node or the endpoint) reports, such as
    ``1.6.22``; used to show whether each node answers. With ``tls``, the certificate is
    verified against ``server_hostname`` (a node's name) while connecting to ``host``.
    """
    endpoint = format_address(host, port)
    deadline = time.monotonic() + timeout
    with _connect(endpoint, host, port, deadline, tls, server_hostname or host) as conn:
        conn.send(b"version\r\n")
        line = conn.read_line()
    if not line.startswith(b"VERSION "):
        raise WrongProtocolData(endpoint, "not a memcached VERSION reply", line)
    return line[len(b"VERSION ") :].decode("ascii", "replace")


def get_cluster_info(
    host: str,
    port: int | str,
    ignore_cluster_errors: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, object]:
    """
    Discover the cluster at ``host:port`` in the shape of django-elasticache 1.x:
    ``{"version": <config version>, "nodes": ["ip:port", ...]}``.

    With ``ignore_cluster_errors`` any discovery failure yields the endpoint itself as the
    only node, with config version 0, which is what a plain development memcached needs.
    """
    try:
        config = discover(host, int(port), timeout)
    except ClusterDiscoveryError:
        if not ignore_cluster_errors:
            raise
        return {"version": 0, "nodes": [format_address(host, int(port))]}
    return {"version": config.version, "nodes": list(config.addresses)}


class _Connection:
    """A socket whose every operation shares the discovery deadline."""

    def __init__(self, endpoint: str, sock: socket.socket, deadline: float) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.deadline = deadline
        self.buffer = b""

    def __enter__(self) -> _Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self._arm_timeout()
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise EndpointTimeout(self.endpoint, "timed out sending the request") from None
        except OSError as exc:
            raise EndpointUnreachable(self.endpoint, f"send failed: {exc}") from None

    def read_line(self) -> bytes:
        """One CRLF-terminated line, without the CRLF."""
        while b"\r\n" not in self.buffer:
            self._receive()
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def read_reply(self) -> bytes:
        """
        A whole reply to a discovery command, up to and including the ``END`` line.

        The first line decides early: an error line or a bare ``END`` is raised as what it
        is, and anything that is not a cluster-config header fails without waiting for the
        timeout. The reply is complete at its first ``END`` line; bytes after it answer no
        request of ours and are ignored, since whether they arrive before the connection is
        closed depends only on how the network cut the stream into packets.
        """
        while b"\r\n" not in self.buffer:
            self._receive()
        header = self.buffer.partition(b"\r\n")[0]
        if header == b"ERROR":
            raise DiscoveryNotSupported(
                self.endpoint,
                "the endpoint does not support cluster discovery (a plain memcached?)",
                header,
            )
        if header.startswith(_ERROR_PREFIXES):
            raise WrongProtocolData(self.endpoint, "the endpoint answered with an error", header)
        if header == b"END":
            raise WrongProtocolData(
                self.endpoint, "no cluster configuration is stored (bare END)", header
            )
        if _HEADER.fullmatch(header) is None:
            raise WrongProtocolData(self.endpoint, "unexpected reply", self.buffer)
        while _END not in self.buffer:
            self._receive()
        return self.buffer[: self.buffer.index(_END) + len(_END)]

    def _receive(self) -> None:
        self._arm_timeout()
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise EndpointTimeout(
                self.endpoint, "timed out waiting for the reply", self.buffer
            ) from None
        except OSError as exc:
            raise EndpointUnreachable(
                self.endpoint, f"receive failed: {exc}", self.buffer
            ) from None
        if not chunk:
            raise WrongProtocolData(self.endpoint, self._closed_problem(), self.buffer)
        self.buffer += chunk
        if len(self.buffer) > MAX_REPLY_BYTES:
            raise WrongProtocolData(
                self.endpoint, f"reply exceeds {MAX_REPLY_BYTES} bytes", self.buffer
            )

    def _closed_problem(self) -> str:
        if self.buffer:
            return "the endpoint closed the connection mid-reply"
        if isinstance(self.sock, ssl.SSLSocket):
            return "the endpoint closed the connection without answering"
        return (
            "the endpoint closed the connection without answering (a cluster with "
            "in-transit encryption does this to clear-text clients: set OPTIONS['TLS'])"
        )

    def _arm_timeout(self) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise EndpointTimeout(self.endpoint, "timed out", self.buffer)
        self.sock.settimeout(remaining)


def _connect(
    endpoint: str,
    host: str,
    port: int,
    deadline: float,
    tls: ssl.SSLContext | None,
    server_hostname: str,
) -> _Connection:
    """Resolve, connect and (with ``tls``) handshake within the deadline."""
    last_error: OSError | None = None
    for family, kind, proto, _, sockaddr in _resolve(endpoint, host, port, deadline):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.connect(sockaddr)
        except TimeoutError:
            sock.close()
            raise EndpointTimeout(endpoint, "timed out connecting") from None
        except OSError as exc:
            sock.close()
            last_error = exc
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock = _handshake(endpoint, sock, tls, server_hostname, deadline)
        return _Connection(endpoint, sock, deadline)
    raise EndpointUnreachable(endpoint, f"cannot connect: {last_error}")


def _handshake(
    endpoint: str,
    sock: socket.socket,
    tls: ssl.SSLContext,
    server_hostname: str,
    deadline: float,
) -> ssl.SSLSocket:
    try:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        return tls.wrap_socket(sock, server_hostname=server_hostname)
    except TimeoutError:
        sock.close()
        raise EndpointTimeout(endpoint, "timed out in the TLS handshake") from None
    except ssl.SSLCertVerificationError as exc:
        sock.close()
        raise EndpointTLSError(
            endpoint, f"TLS certificate verification failed for {server_hostname!r}: {exc}"
        ) from None
    except OSError as exc:
        sock.close()
        raise EndpointTLSError(endpoint, f"TLS handshake failed: {exc}") from None


def _resolve(endpoint: str, host: str, port: int, deadline: float) -> list[tuple]:
    """
    ``getaddrinfo`` with a deadline.

    The C resolver has no timeout of its own and can block for many seconds when DNS is
    unreachable, so a name is resolved in a daemon thread that is abandoned if it overruns.
    An IP address needs no DNS and is converted at once.
    """
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        pass
    outcome: list[object] = []

    def resolve() -> None:
        try:
            outcome.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            outcome.append(exc)

    resolver = threading.Thread(target=resolve, name=f"resolve {endpoint}", daemon=True)
    resolver.start()
    resolver.join(max(deadline - time.monotonic(), 0))
    if not outcome:
        raise EndpointTimeout(endpoint, "timed out resolving the host name")
    result = outcome[0]
    if isinstance(result, OSError):
        raise EndpointUnreachable(endpoint, f"cannot resolve the host name: {result}")
    return result  # type: ignore[return-value]


def _preview(data: bytes, limit: int = 200) -> str:
    """A bounded, printable rendering of bytes from the wire for error messages."""
    if len(data) <= limit:
        return repr(data)
    return f"{data[:limit]!r}... ({len(data)} bytes)"
