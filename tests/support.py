"""Helpers shared by the test modules: processes, sockets, the machine's IPv6 loopback."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

READ_TIMEOUT = 5.0


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def memcached_children() -> list[int]:
    """Pids of memcached processes whose parent is this test process (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
        except OSError:
            continue  # The process ended while we looked.
        command, rest = fields[0].split("(", 1)[1], fields[1].split()
        if command == "memcached" and int(rest[1]) == os.getpid():
            children.append(int(stat.parent.name))
    return children


def read_until_closed(conn: socket.socket) -> bytes:
    """Read everything the server sends until it closes the connection."""
    chunks = []
    deadline = time.monotonic() + READ_TIMEOUT
    while time.monotonic() < deadline:
        chunk = conn.recv(4096)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
    raise AssertionError(f"server did not close the connection; got {b''.join(chunks)!r}")


def ipv6_loopback_works() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


requires_ipv6 = pytest.mark.skipif(not ipv6_loopback_works(), reason="no IPv6 loopback")


NodeTuple = tuple[str, str, int]


def parse_config_reply(reply: bytes) -> tuple[int, list[NodeTuple]]:
    """Parse a ``config get cluster`` reply strictly by the grammar, byte count included."""
    header, rest = reply.split(b"\r\n", 1)
    name, key, flags, length = header.split(b" ")
    assert (name, key, flags) == (b"CONFIG", b"cluster", b"0")
    payload, trailer = rest[: int(length)], rest[int(length) :]
    assert trailer == b"\r\nEND\r\n"
    version, node_list, end = payload.split(b"\n")
    assert end == b""
    nodes = []
    for entry in node_list.decode().split(" "):
        hostname, ip, node_port = entry.split("|")
        nodes.append((hostname, ip, int(node_port)))
    return int(version), nodes
