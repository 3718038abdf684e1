"""
Raw connections to a node or an endpoint, for what must be measured without a client
library in the way: memcached's own counters, a burst of pipelined sets, a discovery reply.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from typing import Protocol


class Reachable(Protocol):
    """A ``LocalCluster`` node, or ``Addressed``."""

    @property
    def ip(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def hostname(self) -> str: ...


@dataclass(frozen=True)
class Addressed:
    """Where to connect, and the name the server's certificate must carry."""

    ip: str
    port: int
    hostname: str


def connect(node: Reachable, context: ssl.SSLContext | None, timeout: float) -> socket.socket:
    """A connection to a node, over TLS with its hostname checked if ``context``."""
    conn = socket.create_connection((node.ip, node.port), timeout=timeout)
    if context is None:
        return conn
    try:
        return context.wrap_socket(conn, server_hostname=node.hostname)
    except BaseException:
        conn.close()
        raise
