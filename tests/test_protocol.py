"""The memcached text protocol of the async path: requests built and replies read exactly."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from django_elasticache import protocol
from django_elasticache.protocol import (
    MAX_LINE_LENGTH,
    ClientErrorReply,
    IllegalKey,
    MalformedReply,
    ServerErrorReply,
    UnknownCommandReply,
    check_key,
    counter_request,
    delete_request,
    flush_all_request,
    parse_counter,
    parse_deleted,
    parse_flushed,
    parse_stats,
    parse_stored,
    parse_touched,
    parse_values,
    retrieval_request,
    stats_request,
    storage_request,
    touch_request,
)

NEXT_REPLY = b"STORED\r\n"
"""What follows a reply on a pipelined connection: a parser must leave it alone."""


def test_requests_are_exact() -> None:
    assert retrieval_request([b"a", b"b"]) == b"get a b\r\n"
    assert storage_request(b"set", b"k", 16, 300, b"v\r\nx") == b"set k 16 300 4\r\nv\r\nx\r\n"
    assert storage_request(b"add", b"k", 0, -1, b"") == b"add k 0 -1 0\r\n\r\n"
    assert delete_request(b"k") == b"delete k\r\n"
    assert touch_request(b"k", 0) == b"touch k 0\r\n"
    assert counter_request(b"decr", b"k", 2**64 - 1) == b"decr k 18446744073709551615\r\n"
    assert flush_all_request() == b"flush_all\r\n"


@pytest.mark.parametrize("delta", [-1, 2**64])
def test_counter_delta_out_of_range_is_refused(delta: int) -> None:
    with pytest.raises(ValueError, match=f"got {delta}"):
        counter_request(b"incr", b"k", delta)


def test_legal_keys_pass_unchanged() -> None:
    assert check_key(b"k" * 250) == b"k" * 250
    assert check_key("é:1:ключ".encode()) == "é:1:ключ".encode()


@pytest.mark.parametrize(
    "key", [b"", b"k" * 251, b"a b", b"a\r\nget b", b"a\nb", b"a\x00", b"\x7f", b"tab\t"]
)
def test_keys_that_would_split_a_command_are_refused(key: bytes) -> None:
    with pytest.raises(IllegalKey, match="memcached keys are 1 to 250 bytes"):
        check_key(key)


def test_values_reply_is_read_by_byte_count() -> None:
    data = b"x\r\nEND\r\nVALUE y 0 1\r\n"  # Looks like protocol, is data.
    reply = b"VALUE a 16 %d\r\n%s\r\nVALUE b 0 0\r\n\r\nEND\r\n" % (len(data), data)
    found, end = parse_values(reply + NEXT_REPLY, 0)
    assert found == {b"a": (16, data), b"b": (0, b"")}
    assert end == len(reply)


def test_values_reply_from_an_offset_with_a_cas_field() -> None:
    before = b"DELETED\r\n"
    reply = b"VALUE k 1 3 99\r\nabc\r\nEND\r\n"
    assert parse_values(before + reply, len(before)) == ({b"k": (1, b"abc")}, len(before + reply))


def test_empty_values_reply() -> None:
    assert parse_values(b"END\r\n", 0) == ({}, 5)


def test_incomplete_values_reply_at_every_cut_waits_for_more() -> None:
    reply = b"VALUE a 0 5\r\nhello\r\nVALUE b 4 2\r\n42\r\nEND\r\n"
    for cut in range(len(reply)):
        assert parse_values(reply[:cut], 0) is None, cut
    found = {b"a": (0, b"hello"), b"b": (4, b"42")}
    assert parse_values(bytearray(reply), 0) == (found, len(reply))


@pytest.mark.parametrize(
    "reply, message",
    [
        (b"VALUE a 0 3\r\nhello\r\nEND\r\n", "not 3 bytes long"),
        (b"VALUE a x 3\r\nabc\r\nEND\r\n", "bad VALUE line"),
        (b"VALUE a 0 -1\r\n\r\nEND\r\n", "bad VALUE line"),
        (b"VALUE a 0\r\n", "expected VALUE or END"),
        (b"STORED\r\n", "expected VALUE or END"),
        (b"VALUE a 0 1\r\nx\r\nSERVER_ERROR oops\r\n", "expected VALUE or END"),
    ],
)
def test_malformed_values_reply_is_an_error(reply: bytes, message: str) -> None:
    with pytest.raises(MalformedReply, match=message):
        parse_values(reply, 0)


@pytest.mark.parametrize(
    "line, kind, message",
    [
        (b"ERROR", UnknownCommandReply, "ERROR"),
        (b"CLIENT_ERROR bad data chunk", ClientErrorReply, "bad data chunk"),
        (b"SERVER_ERROR object too large for cache", ServerErrorReply, "object too large"),
    ],
)
@pytest.mark.parametrize(
    "parser", [parse_values, parse_stored, parse_deleted, parse_touched, parse_counter]
)
def test_refusals_are_complete_replies(parser, line: bytes, kind: type, message: str) -> None:
    reply = line + b"\r\n"
    refusal, end = parser(reply + NEXT_REPLY, 0)
    assert type(refusal) is kind and message in str(refusal)
    assert end == len(reply)


@pytest.mark.parametrize(
    "parser, line, meaning",
    [
        (parse_stored, b"STORED", True),
        (parse_stored, b"NOT_STORED", False),
        (parse_stored, b"EXISTS", False),
        (parse_stored, b"NOT_FOUND", False),
        (parse_deleted, b"DELETED", True),
        (parse_deleted, b"NOT_FOUND", False),
        (parse_touched, b"TOUCHED", True),
        (parse_touched, b"NOT_FOUND", False),
        (parse_flushed, b"OK", True),
        (parse_counter, b"0", 0),
        (parse_counter, b"18446744073709551615", 2**64 - 1),
        (parse_counter, b"NOT_FOUND", None),
    ],
)
def test_status_replies(parser, line: bytes, meaning: object) -> None:
    reply = line + b"\r\n"
    assert parser(reply + NEXT_REPLY, 0) == (meaning, len(reply))
    assert parser(reply[:-1], 0) is None


@pytest.mark.parametrize(
    "parser, line",
    [
        (parse_stored, b"DELETED"),
        (parse_deleted, b"STORED"),
        (parse_touched, b"DELETED"),
        (parse_flushed, b"STORED"),
        (parse_counter, b"-1"),
        (parse_counter, b"12 "),
        (parse_stored, b""),
    ],
)
def test_another_commands_reply_is_an_error(parser, line: bytes) -> None:
    with pytest.raises(MalformedReply, match=repr(line)):
        parser(line + b"\r\n", 0)


def test_endless_line_is_an_error_not_a_wait() -> None:
    assert parse_stored(b"S" * MAX_LINE_LENGTH, 0) is None
    with pytest.raises(MalformedReply, match="longer than"):
        parse_stored(b"S" * (MAX_LINE_LENGTH + 1), 0)
    with pytest.raises(MalformedReply, match="longer than"):
        parse_values(b"VALUE " + b"k" * MAX_LINE_LENGTH, 0)


# A reply read at once must mean what it means read value by value.

_DATA_PIECES = st.sampled_from(
    [b"x", b"\r\n", b"END", b"VALUE k 0 1", b"VALUE k 0 3\r\nabc", b" ", b"\r", b"\n", b"0"]
)
_VALUE_BLOCKS = st.tuples(
    st.sampled_from([b"a", b"k", b":1:key", b"VALUE"]),
    st.integers(0, 2**32 - 1),
    st.lists(_DATA_PIECES, max_size=6).map(b"".join),
    st.sampled_from([b"", b" 7"]),
)


def _reply(values: list[tuple[bytes, int, bytes, bytes]], miscount: int) -> bytes:
    """A ``get`` reply; the first value's byte count off by ``miscount``."""
    blocks = [
        b"VALUE %s %d %d%s\r\n%s\r\n"
        % (key, flags, len(data) + (miscount if index == 0 else 0), cas, data)
        for index, (key, flags, data, cas) in enumerate(values)
    ]
    return b"".join(blocks) + b"END\r\n"


def _one_by_one(buffer: bytes, start: int) -> object:
    try:
        return protocol._values_one_by_one(buffer, start)
    except MalformedReply as error:
        return type(error)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(_VALUE_BLOCKS, max_size=5),
    st.sampled_from([b"", b"DELETED\r\n"]),
    st.sampled_from([b"", b"END\r\n", b"VALUE z 0 1\r\nz\r\nEND\r\n", b"STORED\r\n"]),
    st.integers(0, 40),
    st.sampled_from([0, 0, -2, -1, 1, 2]),
)
def test_values_read_at_once_mean_what_they_mean_value_by_value(
    values: list[tuple[bytes, int, bytes, bytes]],
    before: bytes,
    after: bytes,
    cut: int,
    miscount: int,
) -> None:
    """
    Whatever the buffer (values holding CRLF, ``END`` or lines that look like headers, a
    ``cas`` field, a reply before or after, a cut, a wrong byte count), ``parse_values``
    gives what reading value by value gives, and reads at once every complete reply whose
    values hold no CRLF.
    """
    buffer = before + _reply(values, miscount) + after
    buffer = buffer[: len(buffer) - cut] if cut < len(buffer) else buffer
    expected = _one_by_one(buffer, len(before))
    at_once = protocol._values_at_once(buffer, len(before))
    if at_once is not None:
        assert at_once == expected
    try:
        assert parse_values(buffer, len(before)) == expected
    except MalformedReply as error:
        assert type(error) is expected
    plain = not any(cas or b"\r\n" in data for _, _, data, cas in values)
    if values and plain and not after and cut == 0 and miscount == 0:
        assert at_once is not None
        assert at_once == parse_values(bytearray(buffer), len(before))


def test_values_holding_line_breaks_are_read_value_by_value() -> None:
    data = b"<p>\r\n</p>"
    reply = b"VALUE a 0 %d\r\n%s\r\nVALUE b 2 1\r\nx\r\nEND\r\n" % (len(data), data)
    assert protocol._values_at_once(reply, 0) is None
    assert parse_values(reply, 0) == ({b"a": (0, data), b"b": (2, b"x")}, len(reply))


def test_a_reply_too_large_to_read_at_once_is_read_value_by_value() -> None:
    data = b"x" * (protocol.AT_ONCE_MAX_BYTES // 2)
    reply = b"VALUE a 0 %d\r\n%s\r\nVALUE b 0 %d\r\n%s\r\nEND\r\n" % (
        len(data),
        data,
        len(data),
        data,
    )
    assert protocol._values_at_once(reply, 0) is None
    assert parse_values(reply, 0) == ({b"a": (0, data), b"b": (0, data)}, len(reply))


STATS_REPLY = b"STAT pid 12\r\nSTAT version 1.6.18\r\nSTAT rusage_user 0.100000\r\nEND\r\n"


def test_stats_reply_keeps_every_value_as_sent() -> None:
    assert parse_stats(STATS_REPLY + NEXT_REPLY, 0) == (
        {"pid": b"12", "version": b"1.6.18", "rusage_user": b"0.100000"},
        len(STATS_REPLY),
    )
    assert parse_stats(b"END\r\n", 0) == ({}, 5)


def test_incomplete_stats_reply_at_every_cut_waits_for_more() -> None:
    for cut in range(len(STATS_REPLY)):
        assert parse_stats(STATS_REPLY[:cut], 0) is None, cut


def test_stats_refusal_and_garbage() -> None:
    refusal, end = parse_stats(b"CLIENT_ERROR bad command line format\r\n", 0)
    assert isinstance(refusal, ClientErrorReply) and end == 38
    with pytest.raises(MalformedReply, match="STAT line or END"):
        parse_stats(b"STAT pid 12\r\nVALUE k 0 1\r\n", 0)


def test_stats_requests() -> None:
    assert stats_request() == b"stats\r\n"
    assert stats_request("items") == b"stats items\r\n"
    with pytest.raises(ValueError, match="one word"):
        stats_request("items\r\nflush_all")


REQUIRE_ACCELERATED_VARIABLE = "DJANGO_ELASTICACHE_REQUIRE_ACCELERATED"
"""Set by tox's environments (all but those with the ``pure`` factor): the run must use the
compiled reader, so that a build that silently lost it fails here."""


def test_this_run_uses_the_reader_it_was_asked_for() -> None:
    if os.environ.get(protocol.PURE_PYTHON_VARIABLE, "") not in ("", "0"):
        assert not protocol.ACCELERATED
    elif os.environ.get(REQUIRE_ACCELERATED_VARIABLE, "") not in ("", "0"):
        assert protocol.ACCELERATED, "the compiled reader was required but is not in use"
