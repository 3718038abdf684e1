"""
Requests to a memcached node over a blocking socket, every reply read back and parsed by
``protocol``, the module both this sync path and the event-loop path speak the protocol with.

Two uses. First, many ``set`` or ``delete`` commands to one node in few writes (``exchange``).

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

Second, a batch's first write sent on each of several nodes' sockets before any reply is read
(``first_write``, then ``receive``): a ``get_many``, ``set_many`` or ``delete_many`` over three
nodes then waits for them together, as libmemcached's own multi-server ``get_multi`` does,
not for each node in turn.

A Python socket with a timeout polls before every send and every receive. Here a write goes
out at once and a read takes what has arrived at once, as libmemcached does: the poll (with
the socket's timeout) is made only when the socket buffer is full or nothing has arrived
yet. A ``get_many(20)`` over three nodes, repeated, made 6 system calls a call where
Python's socket calls made 12 (libmemcached's ``get_multi``: 8). TLS sockets, and sockets
without a timeout, keep Python's own calls.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Iterator, Sequence
from typing import Any

from .protocol import (
    CRLF,
    ConnectionClosed,
    Parser,
    Request,
    joined,
    request_length,
    request_pieces,
)

__all__ = [
    "MAX_COMMANDS_PER_WRITE",
    "TLS_WRITE_BYTES",
    "exchange",
    "first_write",
    "receive",
    "send",
]

MAX_COMMANDS_PER_WRITE = 256
"""At most 256 replies (each under 48 bytes) are outstanding: 12 KB, under any socket buffer."""

TLS_WRITE_BYTES = 8192
"""Bytes of several commands one TLS write may carry; 16 KB stall, see the module docstring."""

_READ_SIZE = 262144


def exchange(
    sock: socket.socket,
    requests: Sequence[Request],
    parse: Parser,
    max_write_bytes: int | None = None,
) -> list[Any]:
    """
    Send ``requests`` and return their replies as ``parse`` reads them, in order. Raises
    ``OSError`` when the connection fails or times out and ``protocol.MalformedReply`` for a
    reply that is not memcached's: either way the connection's state is unknown, close it.
    A refusal (``SERVER_ERROR`` ...) is returned as a ``protocol.ErrorReply``, in step.
    """
    replies: list[Any] = []
    for start, end in _writes(requests, max_write_bytes):
        send(sock, requests[start:end])
        replies.extend(receive(sock, parse, end - start))
    return replies


def send(sock: socket.socket, requests: Sequence[Request]) -> None:
    """
    ``sock.sendall`` of the requests. Where the socket takes plain writes (a clear-text
    socket with a timeout, whose descriptor Python keeps non-blocking), what fits in the
    socket buffer is written at once, and the wait for room, bounded by the socket's
    timeout, is paid only for the rest; and requests with a piece too large to copy
    (``protocol.Request``) are written from where their pieces lie (scatter/gather).
    """
    data = joined(requests)
    if not _waits_only_when_needed(sock):
        sock.sendall(b"".join(request_pieces(requests)) if data is None else data)
    elif data is None:  # a request in pieces
        _send_gathered(sock, request_pieces(requests))
    else:
        try:
            sent = os.write(sock.fileno(), data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            sock.sendall(memoryview(data)[sent:])


def _send_gathered(sock: socket.socket, buffers: Sequence[bytes | memoryview]) -> None:
    """``send``'s scatter/gather write: ``writev``, then ``sendmsg``, which waits for room."""
    try:
        sent = os.writev(sock.fileno(), buffers)
    except BlockingIOError:
        sent = 0
    while buffers := _unsent(buffers, sent):
        sent = sock.sendmsg(buffers)


def _unsent(buffers: Sequence[bytes | memoryview], sent: int) -> list[bytes | memoryview]:
    """What is left of ``buffers`` once their first ``sent`` bytes are written."""
    for index, buffer in enumerate(buffers):
        if sent < len(buffer):
            return [memoryview(buffer)[sent:], *buffers[index + 1 :]]
        sent -= len(buffer)
    return []


def first_write(requests: Sequence[Request], max_write_bytes: int | None = None) -> int:
    """
    How many of ``requests`` ``exchange`` sends in its first write: a caller that sends
    them itself, to send to other nodes before reading any reply, reads those replies with
    ``receive`` and leaves the rest to ``exchange``.
    """
    if max_write_bytes is None and 0 < len(requests) <= MAX_COMMANDS_PER_WRITE:
        return len(requests)  # ``_writes``'s one write, without starting a generator.
    return next(_writes(requests, max_write_bytes), (0, 0))[1]


def receive(sock: socket.socket, parse: Parser, count: int = 1) -> list[Any]:
    """
    Read the replies to the ``count`` requests sent last, as ``exchange`` does. The node
    sends nothing unasked: bytes past the last reply mean the stream is out of step.
    """
    replies: list[Any] = []
    buffer = bytearray()
    position = 0
    while len(replies) < count:
        # Every reply ends with CRLF: a buffer that does not is read on before parsing, so
        # that a reply arriving in several reads is not parsed again after each.
        parsed = parse(buffer, position) if buffer.endswith(CRLF) else None
        if parsed is None:
            del buffer[:position]
            position = 0
            _read(sock, buffer)
            continue
        reply, position = parsed
        replies.append(reply)
    if position < len(buffer):
        unexpected = buffer[position:][:80]
        raise ConnectionClosed(f"unexpected bytes after the last reply: {unexpected!r}")
    return replies


def _waits_only_when_needed(sock: socket.socket) -> bool:
    """Whether ``sock`` takes plain reads and writes that never block (see the docstring)."""
    return type(sock) is socket.socket and sock.gettimeout() is not None


def _read(sock: socket.socket, buffer: bytearray) -> None:
    """
    Append the next bytes from the node, waiting for them only if none have arrived. A full
    read means more is on the way (a large value): take whatever else has arrived too,
    without waiting, so that a multi-megabyte reply is parsed a few times rather than once
    per read.
    """
    try:
        if _waits_only_when_needed(sock):
            chunk = os.read(sock.fileno(), _READ_SIZE)
        else:
            chunk = sock.recv(_READ_SIZE)
    except BlockingIOError:
        chunk = sock.recv(_READ_SIZE)  # Nothing has arrived yet: wait for it.
    if not chunk:
        raise ConnectionClosed("the node closed the connection")
    buffer += chunk
    if len(chunk) < _READ_SIZE:
        return
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        while chunk:
            chunk = sock.recv(_READ_SIZE)
            buffer += chunk
    except (BlockingIOError, ssl.SSLWantReadError):
        pass  # nothing more for now
    finally:
        sock.settimeout(timeout)


def _writes(commands: Sequence[Request], max_write_bytes: int | None) -> Iterator[tuple[int, int]]:
    """The ``(start, end)`` slices of ``commands`` each write sends."""
    if max_write_bytes is None and 0 < len(commands) <= MAX_COMMANDS_PER_WRITE:
        yield 0, len(commands)
        return
    limit = max_write_bytes or float("inf")
    start, size = 0, 0
    for index, command in enumerate(commands):
        length = request_length(command)
        if index > start and (index - start >= MAX_COMMANDS_PER_WRITE or size + length > limit):
            yield start, index
            start, size = index, 0
        size += length
    if start < len(commands):
        yield start, len(commands)
