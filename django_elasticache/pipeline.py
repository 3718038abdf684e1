"""
Many ``set`` or ``delete`` commands to one memcached node in few writes, every reply read back.

libmemcached (pylibmc) sends ``set_multi`` and ``delete_multi`` one command per round trip. Its
``_noreply`` behaviour pipelines them but drops the replies, so a key the node refused (a value
over the item size limit, memory full) would pass for stored and Django could not report it.
Here a batch goes out in the text protocol in as few writes as two bounds allow, and the reply
to every command is read back in order: each key's outcome is known, as one at a time.

The bounds:

- ``MAX_COMMANDS_PER_WRITE``: the replies to one write must fit in the socket buffers. Otherwise
  the node stops reading while it cannot send, the client blocks writing, and both wait.
- ``max_write_bytes``, for TLS: memcached 1.6.18 stops reading a TLS connection that delivers
  more small commands than one 16 KB TLS record holds (measured: 16,450 bytes of 100-byte sets
  in one write are all answered, 16,690 bytes get no reply until the timeout). ``TLS_WRITE_BYTES``
  keeps half a record of margin. A single command larger than the bound is sent alone: memcached
  reads one command's value whatever its size.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence

__all__ = [
    "MAX_COMMANDS_PER_WRITE",
    "TLS_WRITE_BYTES",
    "TOO_LARGE",
    "delete_command",
    "exchange",
    "set_command",
]

MAX_COMMANDS_PER_WRITE = 256
"""At most 256 replies (each under 48 bytes) are outstanding: 12 KB, under any socket buffer."""

TLS_WRITE_BYTES = 8192
"""Bytes of several commands one TLS write may carry; 16 KB stall, see the module docstring."""

TOO_LARGE = b"SERVER_ERROR object too large for cache"
"""memcached's reply to a value over its item size limit; it also drops the key's old value."""

_READ_SIZE = 65536


def set_command(key: bytes, flags: int, exptime: int, data: bytes) -> bytes:
    return b"set %s %d %d %d\r\n%s\r\n" % (key, flags, exptime, len(data), data)


def delete_command(key: bytes) -> bytes:
    return b"delete %s\r\n" % key


def exchange(
    sock: socket.socket, commands: Sequence[bytes], max_write_bytes: int | None = None
) -> list[bytes]:
    """
    Send ``commands`` and return their one-line replies, in order. Raises ``OSError`` when the
    connection fails or times out (its state is then unknown: close it), including
    ``ConnectionResetError`` when the node closes it.
    """
    replies: list[bytes] = []
    pending = b""
    for start, end in _writes(commands, max_write_bytes):
        sock.sendall(b"".join(commands[start:end]))
        pending = _read_lines(sock, pending, end - start, replies)
    if pending:
        raise ConnectionResetError(f"unexpected bytes after the last reply: {pending[:80]!r}")
    return replies


def _writes(commands: Sequence[bytes], max_write_bytes: int | None) -> Iterator[tuple[int, int]]:
    """The ``(start, end)`` slices of ``commands`` each write sends."""
    if max_write_bytes is None and 0 < len(commands) <= MAX_COMMANDS_PER_WRITE:
        yield 0, len(commands)
        return
    limit = max_write_bytes or float("inf")
    start, size = 0, 0
    for index, command in enumerate(commands):
        if index > start and (
            index - start >= MAX_COMMANDS_PER_WRITE or size + len(command) > limit
        ):
            yield start, index
            start, size = index, 0
        size += len(command)
    if start < len(commands):
        yield start, len(commands)


def _read_lines(sock: socket.socket, pending: bytes, count: int, replies: list[bytes]) -> bytes:
    """Read until ``count`` reply lines arrived; append them and return what follows them."""
    while pending.count(b"\r\n") < count:
        chunk = sock.recv(_READ_SIZE)
        if not chunk:
            raise ConnectionResetError("the node closed the connection")
        pending += chunk
    lines = pending.split(b"\r\n", count)
    replies.extend(lines[:count])
    return lines[count]
