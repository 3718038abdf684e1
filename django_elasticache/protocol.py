"""
The memcached text protocol, without I/O: requests as bytes, replies parsed from a buffer.

Both paths that speak the protocol themselves use it: the event loop's connections
(``async_client``) and the blocking sockets of the sync pipelines (``pipeline``). Either may
have several requests on a connection at once and matches replies to them in order, so a
reply must be recognised exactly: a parser that read too little or too much would hand the
next caller someone else's value. Every parser here therefore takes the
receive buffer and an offset, and returns either ``None`` (the reply is not complete yet)
or the reply's meaning and the offset just past it. A reply the server sends to refuse a
request (``ERROR``, ``CLIENT_ERROR``, ``SERVER_ERROR``) is a complete reply too: it is
returned as an ``ErrorReply`` for the caller to raise, and the stream stays in step.
Anything else that is not the reply the request expects raises ``MalformedReply``: the
connection can no longer be trusted and must be closed.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "ACCELERATED",
    "COMPILED",
    "MAX_KEY_LENGTH",
    "UNCOPIED_DATA_BYTES",
    "VALUE_TOO_LARGE",
    "ClientErrorReply",
    "ConnectionClosed",
    "ErrorReply",
    "IllegalKey",
    "KeyTooLong",
    "MalformedReply",
    "Parser",
    "Request",
    "ServerErrorReply",
    "UnknownCommandReply",
    "check_key",
    "counter_request",
    "decoded_values",
    "decoded_values_in_python",
    "delete_request",
    "flush_all_request",
    "joined",
    "key_not_asked_for",
    "parse_counter",
    "parse_deleted",
    "parse_flushed",
    "parse_stats",
    "parse_stored",
    "parse_touched",
    "parse_values",
    "parse_values_in_python",
    "request_length",
    "request_pieces",
    "retrieval_request",
    "retrieval_request_for",
    "retrieval_request_in_python",
    "stats_request",
    "storage_request",
    "touch_request",
]

MAX_KEY_LENGTH = 250
"""memcached's limit on a key, in bytes."""

MAX_LINE_LENGTH = 8192
"""A reply line (without data) longer than this is not memcached talking."""

VALUE_TOO_LARGE = "object too large for cache"
"""memcached's SERVER_ERROR text for a value over its item size limit."""

UNCOPIED_DATA_BYTES = 65536
"""
A storage request's data block of this many bytes or more is not copied into the request
(see ``Request``): measured on a ``set_many`` of ten 500 KB values, building each request by
copying its value took longer than sending them all.
"""

CRLF = b"\r\n"

_NOT_IN_A_KEY = re.compile(rb"[\x00-\x20\x7f]")


class ConnectionClosed(ConnectionResetError):
    """
    The byte stream ended, or the connection was closed, before the reply was complete. Not a
    ``ProtocolError``: the node went away, which is a connection failure.
    """


class ProtocolError(Exception):
    """Base class of what the protocol layer reports."""


class IllegalKey(ProtocolError, ValueError):
    """
    A key memcached would split or refuse: in a pipelined stream a space or line break in a
    key would turn the rest of the request into another command, so it is never sent.
    """


class KeyTooLong(IllegalKey):
    """A key over memcached's 250 bytes (a key of 250 characters may be longer in UTF-8)."""

    def __init__(self, key: bytes) -> None:
        self.length = len(key)
        super().__init__(
            f"memcached keys are 1 to {MAX_KEY_LENGTH} bytes, got {self.length}: {key!r}"
        )


class MalformedReply(ProtocolError):
    """The server sent something that is not the reply the request expects."""


class ErrorReply(ProtocolError):
    """The server refused the request; the connection stays in step."""


class UnknownCommandReply(ErrorReply):
    """``ERROR``: the server does not know the command."""


class ClientErrorReply(ErrorReply):
    """``CLIENT_ERROR <message>``: the request was malformed (a non-numeric incr, ...)."""


class ServerErrorReply(ErrorReply):
    """``SERVER_ERROR <message>``: the server could not do it (a value too large, ...)."""


Parsed = tuple[Any, int]
Parser = Callable[[bytes | bytearray, int], Parsed | None]
"""Reads one reply from ``buffer[start:]``: ``None`` if incomplete, else (meaning, end)."""


def check_key(key: bytes) -> bytes:
    """Refuse a key that memcached would not read as one key of at most 250 bytes."""
    if len(key) > MAX_KEY_LENGTH:
        raise KeyTooLong(key)
    if not key or _NOT_IN_A_KEY.search(key):
        raise IllegalKey(
            f"memcached keys are 1 to {MAX_KEY_LENGTH} bytes without spaces or control "
            f"characters, got {key!r}"
        )
    return key


def key_not_asked_for(found: Mapping[bytes, Any], asked: Mapping[bytes, Any]) -> Exception | None:
    """
    For a ``KeyError`` raised while a ``get`` reply's keys are mapped back to the keys asked
    for: the error to raise if the reply holds a key not asked for (the stream is out of
    step, the reply is another request's: close the connection), None if the ``KeyError``
    came from elsewhere. Checked only then, so that a reply in step costs nothing more.
    """
    for key in found:
        if key not in asked:
            return MalformedReply(f"reply holds key {key!r}, which was not asked for")
    return None


# Requests

Request = bytes | tuple[bytes, ...]
"""
A request as it is sent: its bytes, or the pieces it is written from (``storage_request``
with a large data block), which a writer that can gather sends where they lie and any other
writer joins (``request_pieces``).
"""


def request_pieces(requests: Iterable[Request]) -> list[bytes]:
    """Every piece of ``requests``, in order: a request's bytes are one piece."""
    pieces: list[bytes] = []
    for request in requests:
        if isinstance(request, tuple):
            pieces.extend(request)
        else:
            pieces.append(request)
    return pieces


def joined(requests: Sequence[Request]) -> bytes | None:
    """
    The requests in one buffer, as one write sends them; ``None`` if one of them is in
    pieces, which are never copied (the join's ``TypeError`` tells, at no cost to the rest).
    """
    if len(requests) == 1:
        return requests[0] if type(requests[0]) is bytes else None
    try:
        return b"".join(requests)  # type: ignore[arg-type]
    except TypeError:
        return None


def request_length(request: Request) -> int:
    """The bytes a request sends."""
    return sum(map(len, request)) if isinstance(request, tuple) else len(request)


def retrieval_request(keys: Iterable[bytes]) -> bytes:
    return b"get " + b" ".join(keys) + CRLF


def retrieval_request_in_python(keys: list[Any]) -> tuple[bytes, dict[bytes, Any]] | None:
    """
    A node's ``get`` request for str or bytes keys (str sent as UTF-8), and the keys asked
    for by what is sent, to map the reply back; ``None`` if a key is neither or is over 250
    bytes (a client library then reports it its own way). ``retrieval_request_for`` is
    this function, or where it is built, its compiled twin.
    """
    encoded = [key.encode() if type(key) is str else key for key in keys]
    if any(type(key) is not bytes or len(key) > MAX_KEY_LENGTH for key in encoded):
        return None
    return retrieval_request(encoded), dict(zip(encoded, keys, strict=True))


def storage_request(command: bytes, key: bytes, flags: int, exptime: int, data: bytes) -> Request:
    """
    ``set``, ``add`` or another storage command with its data block: in one piece, or from
    ``UNCOPIED_DATA_BYTES`` on, in three (command line, data, CRLF), the data not copied.
    """
    if len(data) < UNCOPIED_DATA_BYTES:
        return b"%s %s %d %d %d\r\n%s\r\n" % (command, key, flags, exptime, len(data), data)
    return b"%s %s %d %d %d\r\n" % (command, key, flags, exptime, len(data)), data, CRLF


def delete_request(key: bytes) -> bytes:
    return b"delete " + key + CRLF


def touch_request(key: bytes, exptime: int) -> bytes:
    return b"touch %s %d\r\n" % (key, exptime)


def counter_request(command: bytes, key: bytes, delta: int) -> bytes:
    """``incr`` or ``decr``; memcached takes an unsigned 64-bit delta."""
    if not 0 <= delta < 2**64:
        raise ValueError(f"memcached {command.decode()} needs 0 <= delta < 2**64, got {delta}")
    return b"%s %s %d\r\n" % (command, key, delta)


def flush_all_request() -> bytes:
    return b"flush_all\r\n"


def stats_request(group: str | None = None) -> bytes:
    """``stats``, or ``stats <group>`` (``items``, ``slabs``, ``settings``...)."""
    if group is None:
        return b"stats\r\n"
    if not group or _NOT_IN_A_KEY.search(group.encode()):
        raise ValueError(f"a stats group is one word, got {group!r}")
    return b"stats %s\r\n" % group.encode()


# Replies


def _line(buffer: bytes | bytearray, start: int) -> tuple[bytes, int] | None:
    end = buffer.find(CRLF, start, start + MAX_LINE_LENGTH + 2)
    if end < 0:
        if len(buffer) - start > MAX_LINE_LENGTH:
            raise MalformedReply(f"reply line longer than {MAX_LINE_LENGTH} bytes")
        return None
    return bytes(buffer[start:end]), end + 2


def _error_reply(line: bytes) -> ErrorReply | None:
    """The refusal a line carries, if it is one."""
    if line == b"ERROR":
        return UnknownCommandReply("ERROR")
    kind, _, message = line.partition(b" ")
    if kind == b"CLIENT_ERROR":
        return ClientErrorReply(message.decode(errors="replace"))
    if kind == b"SERVER_ERROR":
        return ServerErrorReply(message.decode(errors="replace"))
    return None


def _status_parser(outcomes: Mapping[bytes, Any]) -> Parser:
    """A parser for a one-line reply with a fixed set of answers."""

    def parse(buffer: bytes | bytearray, start: int) -> Parsed | None:
        found = _line(buffer, start)
        if found is None:
            return None
        line, end = found
        if line in outcomes:
            return outcomes[line], end
        refusal = _error_reply(line)
        if refusal is None:
            raise MalformedReply(f"expected one of {sorted(outcomes)}, got {line!r}")
        return refusal, end

    return parse


parse_stored = _status_parser(
    {b"STORED": True, b"NOT_STORED": False, b"EXISTS": False, b"NOT_FOUND": False}
)
parse_deleted = _status_parser({b"DELETED": True, b"NOT_FOUND": False})
parse_touched = _status_parser({b"TOUCHED": True, b"NOT_FOUND": False})
parse_flushed = _status_parser({b"OK": True})
_parse_counter_miss = _status_parser({b"NOT_FOUND": None})


def parse_counter(buffer: bytes | bytearray, start: int) -> Parsed | None:
    """``incr``/``decr``: the new value as an int, or ``None`` for a missing key."""
    found = _line(buffer, start)
    if found is None:
        return None
    line, end = found
    if line.isdigit():
        return int(line), end
    return _parse_counter_miss(buffer, start)


def parse_stats(buffer: bytes | bytearray, start: int) -> Parsed | None:
    """
    The reply to ``stats``: ``{name: value}`` up to ``END``, each value the bytes the server
    sent (``b"1.6.18"``, ``b"42"``), as pylibmc's ``get_stats`` returns them.
    """
    stats: dict[str, bytes] = {}
    position = start
    while True:
        found = _line(buffer, position)
        if found is None:
            return None
        line, position = found
        if line == b"END":
            return stats, position
        kind, _, stat = line.partition(b" ")
        if kind != b"STAT":
            refusal = None if stats else _error_reply(line)
            if refusal is None:
                raise MalformedReply(f"expected a STAT line or END, got {line!r}")
            return refusal, position
        name, _, value = stat.partition(b" ")
        stats[name.decode(errors="replace")] = value


_VALUE_LINE = re.compile(rb"VALUE ([^ \r\n]+) (\d+) (\d+)(?: \d+)?\r\n")
"""A well-formed ``VALUE`` line, the common case read without splitting it in Python."""


def parse_values_in_python(buffer: bytes | bytearray, start: int) -> Parsed | None:
    """
    The reply to ``get``: ``{key: (flags, data)}`` for the keys found, up to ``END``.
    Each value's byte count is checked against its data block's terminator. The common
    reply, complete and last in the buffer, is read at once (``_values_at_once``), any
    other value by value (``_values_one_by_one``), with the same result.

    ``parse_values`` is this function, or where it is built, its compiled twin (see
    ``ACCELERATED``).
    """
    return _values_at_once(buffer, start) or _values_one_by_one(buffer, start)


def _values_one_by_one(buffer: bytes | bytearray, start: int) -> Parsed | None:
    """
    ``parse_values`` for any reply, incomplete or malformed ones included. A line that is
    not a well-formed ``VALUE`` line (``END``, a refusal, garbage, a line not complete yet)
    is read by ``_other_values_line``.
    """
    found: dict[bytes, tuple[int, bytes]] = {}
    position = start
    value_line = _VALUE_LINE.match
    size = len(buffer)
    while True:
        header = value_line(buffer, position)
        if header is not None and header.end() - position <= MAX_LINE_LENGTH + 2:
            key, flags_text, length_text = header.groups()
            flags, length = int(flags_text), int(length_text)
            position = header.end()
        else:
            outcome = _other_values_line(buffer, position, found)
            if outcome is None or type(outcome[0]) is not tuple:
                return outcome
            (key, flags, length), position = outcome
        data_end = position + length
        if size < data_end + 2:
            return None
        if buffer[data_end : data_end + 2] != CRLF:
            raise MalformedReply(f"value of {key!r} is not {length} bytes long")
        data = buffer[position:data_end]
        found[key] = (flags, data if isinstance(data, bytes) else bytes(data))
        position = data_end + 2


_REPLY_END = b"\r\nEND\r\n"

AT_ONCE_MAX_BYTES = 16 * 1024
"""Replies up to this size are read at once. Larger ones are mostly data: splitting copies
it twice more into fresh memory, which costs more than reading their few values one by one
(measured: three values of 10 KB took about 30 µs longer at once)."""

_VALUE_HEADER = rb"VALUE [^ \r\n]{1,250} \d{1,20} \d{1,20}"
_VALUE_HEADERS = re.compile(_VALUE_HEADER + rb"(?:\r\n" + _VALUE_HEADER + rb")*")
"""``VALUE <key> <flags> <bytes>`` lines, one after another, each with exactly those fields."""


def _values_at_once(buffer: bytes | bytearray, start: int) -> Parsed | None:
    """
    ``parse_values`` for a reply of values that ends the buffer, in a few passes in C rather
    than a loop in Python over the values: split at every CRLF, take the pieces as header,
    data, header, data..., and accept the split only if every header is a ``VALUE`` line and
    every data piece has the length its header gives.

    That check is exact. Reading from ``start``, the first piece is the first header; if its
    data block held a CRLF, the piece after the header would be shorter than announced and
    the split is refused; so the data piece is the whole block, the next piece starts at
    the next line, and so on to ``END``. ``None`` when the split is refused (a CRLF in a
    value, a ``cas`` field, another reply after this one, no value at all, a reply over
    ``AT_ONCE_MAX_BYTES``): the reply is then read value by value, which also says what is
    wrong with it if anything is.
    """
    stop = len(buffer) - len(_REPLY_END)
    if not start < stop <= start + AT_ONCE_MAX_BYTES or not buffer.endswith(_REPLY_END):
        return None
    pieces = bytes(memoryview(buffer)[start:stop]).split(CRLF)
    headers, blocks = pieces[0::2], pieces[1::2]
    if len(headers) != len(blocks) or _VALUE_HEADERS.fullmatch(CRLF.join(headers)) is None:
        return None
    fields = b" ".join(headers).split(b" ")
    if list(map(len, blocks)) != list(map(int, fields[3::4])):
        return None
    found = dict(zip(fields[1::4], zip(map(int, fields[2::4]), blocks, strict=True), strict=True))
    return found, len(buffer)


def decoded_values_in_python(
    found: dict[bytes, tuple[int, bytes]],
    asked: Mapping[bytes, Any],
    decode: Callable[[bytes, int], Any],
    flag: int,
    decode_flagged: Callable[[bytes, int], Any],
    text_flags: int,
) -> dict[Any, Any]:
    """
    What ``parse_values`` found, under the keys the caller asked for (``asked``, as
    ``retrieval_request_for`` returns it) and decoded: ``decode(data, flags)``, or
    ``decode_flagged`` for values whose flags have ``flag`` (a compressed value).
    ``KeyError`` for a key not asked for. ``decoded_values`` is this function, or where it
    is built, its compiled twin.

    Two kinds of value are decoded without a call, as pylibmc and python-memcached's
    flags mean them (the caller vouches that ``decode`` agrees): flags 0 are the bytes as
    they are, flags ``text_flags`` UTF-8 text.
    """
    if text_flags == 0:
        raise ValueError("text_flags must not be 0, the flags of bytes")
    return {
        asked[key]: _decoded(data, flags, decode, flag, decode_flagged, text_flags)
        for key, (flags, data) in found.items()
    }


def _decoded(
    data: bytes,
    flags: int,
    decode: Callable[[bytes, int], Any],
    flag: int,
    decode_flagged: Callable[[bytes, int], Any],
    text_flags: int,
) -> Any:
    if type(flags) is int and type(data) is bytes and flags in (0, text_flags):
        return data if flags == 0 else data.decode()
    return decode_flagged(data, flags) if flags & flag else decode(data, flags)


def _other_values_line(
    buffer: bytes | bytearray, start: int, found: dict[bytes, tuple[int, bytes]]
) -> Parsed | None:
    """
    A line of a ``get`` reply that is not a plain well-formed ``VALUE`` line: ``None`` if
    incomplete, the reply (``found``, or a refusal) and its end at ``END`` or a refusal,
    or a ``VALUE`` line's ``(key, flags, length)`` and the offset of its data.
    """
    header = _line(buffer, start)
    if header is None:
        return None
    line, position = header
    if line == b"END":
        return found, position
    fields = line.split(b" ")
    if fields[0] != b"VALUE" or len(fields) not in (4, 5):
        refusal = _error_reply(line)
        if refusal is None or found:
            raise MalformedReply(f"expected VALUE or END, got {line!r}")
        return refusal, position
    try:
        flags, length = int(fields[2]), int(fields[3])
    except ValueError:
        raise MalformedReply(f"bad VALUE line {line!r}") from None
    if length < 0 or flags < 0:
        raise MalformedReply(f"bad VALUE line {line!r}")
    return (fields[1], flags, length), position


# The compiled loops


PURE_PYTHON_VARIABLE = "DJANGO_ELASTICACHE_PURE_PYTHON"
"""Set to 1, the pure-Python loops are used even where the compiled ones are built."""


def _compiled_module() -> Any:
    """
    The optional C extension ``_speedups``, or ``None`` where it is not built or is turned
    off. Each of its functions means exactly what its Python twin means.
    """
    if os.environ.get(PURE_PYTHON_VARIABLE, "") not in ("", "0"):
        return None
    try:
        from . import _speedups
    except ImportError:
        return None
    return _speedups


COMPILED = _compiled_module()
"""The compiled module in use, or ``None``: ``backend`` and ``routing`` take theirs here."""

parse_values: Parser = (
    functools.partial(COMPILED.parse_values, _other_values_line, MalformedReply)
    if COMPILED is not None
    else parse_values_in_python
)
"""Reads the reply to ``get``; see ``parse_values_in_python`` for what it returns."""

retrieval_request_for: Callable[[list[Any]], tuple[bytes, dict[bytes, Any]] | None] = (
    COMPILED.retrieval_request if COMPILED is not None else retrieval_request_in_python
)
"""See ``retrieval_request_in_python``."""

decoded_values: Callable[..., dict[Any, Any]] = (
    COMPILED.decoded_values if COMPILED is not None else decoded_values_in_python
)
"""See ``decoded_values_in_python``."""

ACCELERATED = COMPILED is not None
"""Whether the compiled loops are in use."""
