"""
The compiled loops (``django_elasticache._speedups``) mean exactly what their Python twins
mean, whatever the input: the reader whatever the bytes, the key loops of ``get_many``
whatever the keys; and they are the ones in use unless turned off.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import django_elasticache
from django_elasticache import backend, protocol, routing
from django_elasticache.protocol import (
    MAX_KEY_LENGTH,
    MAX_LINE_LENGTH,
    PURE_PYTHON_VARIABLE,
    ErrorReply,
    MalformedReply,
    parse_values_in_python,
)

_speedups = pytest.importorskip("django_elasticache._speedups")
compiled_parse_values = functools.partial(
    _speedups.parse_values, protocol._other_values_line, MalformedReply
)


def outcome(parse: protocol.Parser, buffer: bytes | bytearray, start: int) -> object:
    """What a reader returns, or the class and text of what it raises, comparably."""
    try:
        parsed = parse(buffer, start)
    except MalformedReply as error:
        return ("raises", type(error), str(error))
    if parsed is not None and isinstance(parsed[0], ErrorReply):
        return ("refusal", type(parsed[0]), str(parsed[0]), parsed[1])
    return parsed


def assert_same(buffer: bytes, start: int) -> None:
    expected = outcome(parse_values_in_python, buffer, start)
    assert outcome(compiled_parse_values, buffer, start) == expected
    assert outcome(compiled_parse_values, bytearray(buffer), start) == expected


_NUMBERS = st.one_of(
    st.integers(0, 2**32 - 1).map(b"%d".__mod__),
    st.sampled_from(
        [b"0", b"007", b"-1", b"+1", b"1_0", b"x", b"", b"\t1", b"1\r", b"9" * 19, b"9" * 40]
        + [b"%d" % number for number in (2**63 - 1, 2**63, 2**64, 10**30)]
    ),
)
_KEYS = st.one_of(
    st.sampled_from([b"k", b":1:key", b"VALUE", b"END", b"a b", b"a\rb", b"a\nb", b""]),
    st.binary(min_size=1, max_size=12),
    st.just(b"k" * (MAX_LINE_LENGTH + 1)),
)
_DATA = st.lists(
    st.sampled_from(
        [
            b"x",
            b"\r\n",
            b"END",
            b"END\r\n",
            b"VALUE k 0 1",
            b"VALUE k 0 3\r\nabc",
            b" ",
            b"\r",
            b"\n",
            b"\x00",
            b"\xff",
            b"SERVER_ERROR x\r\n",
        ]
    ),
    max_size=6,
).map(b"".join)
_VALUES = st.tuples(
    _KEYS,
    _NUMBERS,
    _DATA,
    st.one_of(st.integers(-3, 3), _NUMBERS),  # the byte count: off by a little, or any field
    st.sampled_from([b"", b" 7", b" x", b" 1 2", b" " + b"9" * 30, b"  "]),
)
_LINES = st.sampled_from(
    [
        b"",
        b"END\r\n",
        b"ERROR\r\n",
        b"CLIENT_ERROR bad\r\n",
        b"SERVER_ERROR out of memory\r\n",
        b"STORED\r\n",
        b"VALUE z 0 1\r\nz\r\nEND\r\n",
        b"garbage\r\n",
        b"END",
        b"\r\n",
        b"END\rEND\r\n",
        b"END \r\n",
        b"ENDED\r\n",
        b"VALUE\r\n",
    ]
)


def hostile_reply(values: list[tuple[bytes, bytes, bytes, int | bytes, bytes]]) -> bytes:
    """A ``get`` reply whose byte counts are the data's length moved by an int, or a field."""
    blocks = []
    for key, flags, data, count, cas in values:
        length = b"%d" % (len(data) + count) if isinstance(count, int) else count
        blocks.append(b"VALUE %s %s %s%s\r\n%s\r\n" % (key, flags, length, cas, data))
    return b"".join(blocks)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(_VALUES, max_size=5),
    _LINES,
    _LINES,
    _LINES,
    st.integers(0, 60),
    st.integers(0, 10),
    st.data(),
)
def test_the_compiled_reader_means_what_the_python_reader_means(
    values: list[tuple[bytes, bytes, bytes, int | bytes, bytes]],
    before: bytes,
    end: bytes,
    after: bytes,
    cut: int,
    start_shift: int,
    data: st.DataObject,
) -> None:
    """
    Any reply, hostile ones included (values holding CRLF, ``END`` or fake VALUE lines,
    cas fields, replies before and after, wrong, huge, negative or non-numeric byte counts
    and flags, keys with odd bytes, over-long lines, cuts, any one byte replaced), read from
    any offset: the same
    reply and offset, ``None``, refusal or ``MalformedReply`` with the same text.
    """
    buffer = before + hostile_reply(values) + end + after
    buffer = buffer[: max(0, len(buffer) - cut)]
    if buffer and data.draw(st.booleans(), "replace a byte"):
        offset = data.draw(st.integers(0, len(buffer) - 1), "at")
        buffer = (
            buffer[:offset] + data.draw(st.binary(min_size=1, max_size=1)) + buffer[offset + 1 :]
        )
    assert_same(buffer, min(len(before) + start_shift, len(buffer) + 1))


@pytest.mark.parametrize(
    "reply",
    [
        b"VALUE a 1 5\r\nEND\r\n\r\nVALUE b 2 3 44\r\n\r\nx\r\nEND\r\n",
        b"VALUE a 1 3 x\r\nabc\r\nVALUE a 2 1\r\nz\r\nEND\r\n",
        b"VALUE a 1 3\r\nabcd\r\nEND\r\n",
        b"VALUE a 99999999999999999999 3\r\nabc\r\nEND\r\n",
        b"VALUE a 0 99999999999999999999\r\nabc\r\nEND\r\n",
        b"VALUE a 1 3\r\nabc\r\nSERVER_ERROR late\r\n",
        b"SERVER_ERROR out of memory\r\nEND\r\n",
    ],
)
def test_the_readers_agree_at_every_cut(reply: bytes) -> None:
    for cut in range(len(reply) + 1):
        assert_same(reply[:cut], 0)
        assert_same(b"STORED\r\n" + reply[:cut], 8)


def test_the_readers_agree_on_over_long_lines() -> None:
    for size in range(MAX_LINE_LENGTH - 8, MAX_LINE_LENGTH + 4):
        line = b"VALUE " + b"k" * (size - len(b"VALUE  0 1")) + b" 0 1"
        assert_same(line, 0)
        assert_same(line + b"\r\nx\r\nEND\r\n", 0)
        assert_same(b"x" * size + b"\r\n", 0)


def test_the_compiled_reader_refuses_a_negative_offset() -> None:
    with pytest.raises(ValueError, match="-1"):
        compiled_parse_values(b"END\r\n", -1)


def result_or_error(call: Callable[..., Any], *args: Any) -> object:
    """What a call returns, or the class of what it raises, comparably."""
    try:
        return ("returns", call(*args))
    except Exception as error:
        return ("raises", type(error))


_KEY_TEXT = st.one_of(
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12),
    st.text(max_size=6),
    st.sampled_from(["", " ", "a b", "\x7f", "é", "\ud800", "k" * 247, "k" * 251]),
)
_ANY_KEYS = st.lists(
    st.one_of(
        _KEY_TEXT,
        _KEY_TEXT.map(lambda text: text.encode("utf-8", "surrogatepass")),
        st.integers(-2, 2),
    ),
    max_size=8,
)


@settings(max_examples=2000, deadline=None)
@given(st.sampled_from([":1:", "p:2:", "", "é:1:", "a b:1:"]), _ANY_KEYS)
def test_prefixed_keys_is_the_common_case_of_django_key_making(
    prefix: str, keys: list[Any]
) -> None:
    """
    Not None exactly when the prefix and every key are ASCII and each made key is one
    Django accepts as it is (1 to 250 characters, none a space, control character or DEL),
    and then the keys the backend makes otherwise, in the same order.
    """
    made = _speedups.prefixed_keys(prefix, keys)
    plain = all("!" <= character <= "~" for character in prefix) and all(
        type(key) is str
        and (prefix + key).isascii()
        and 0 < len(prefix + key) <= MAX_KEY_LENGTH
        and all("!" <= character <= "~" for character in prefix + key)
        for key in keys
    )
    assert (made is not None) == plain
    if made is not None:
        assert list(made.items()) == list({prefix + key: key for key in keys}.items())


_VERSIONS = st.one_of(st.integers(-(10**30), 10**30), _KEY_TEXT, st.booleans())


@settings(max_examples=2000, deadline=None)
@given(
    st.booleans(),
    st.one_of(_KEY_TEXT, st.integers(-1, 1)),
    _VERSIONS,
    st.one_of(_KEY_TEXT, _KEY_TEXT.map(lambda text: text.encode("utf-8", "surrogatepass"))),
    st.one_of(st.none(), _VERSIONS),
)
# The compiled function writes an int version's digits itself where it fits a long long.
@example(True, "p", 1, "k", 0)
@example(True, "p", 1, "k", -(2**63))
@example(True, "p", 1, "k", 2**63 - 1)
@example(True, "p", 1, "k", 2**63)
@example(True, "p", 1, "k", -(2**63) - 1)
@example(True, "p", 1, "k", 10**230)
def test_made_key_means_what_its_python_twin_means(
    default_key_making: bool, prefix: Any, cache_version: Any, key: Any, version: Any
) -> None:
    cache = types.SimpleNamespace(
        _default_key_making=default_key_making, key_prefix=prefix, version=cache_version
    )
    made = _speedups.made_key(cache, key, version)
    assert made == backend.made_key_in_python(cache, key, version)
    if made is not None:
        assert default_key_making
        assert made == f"{prefix}:{cache_version if version is None else version}:{key}"
        assert all("!" <= character <= "~" for character in made) and len(made) <= 250


@pytest.mark.parametrize("missing", ["_default_key_making", "key_prefix", "version"])
@pytest.mark.parametrize("made_key", [_speedups.made_key, backend.made_key_in_python])
def test_made_key_raises_for_a_cache_attribute_that_is_missing(
    made_key: Callable[..., Any], missing: str
) -> None:
    attributes = {"_default_key_making": True, "key_prefix": "p", "version": 1}
    del attributes[missing]
    with pytest.raises(AttributeError, match=missing):
        made_key(types.SimpleNamespace(**attributes), "key", None)


@settings(max_examples=1000, deadline=None)
@given(_ANY_KEYS, st.integers(0, 4), st.integers(-5, 5))
def test_group_by_node_means_what_its_python_twin_means(
    keys: list[Any], count: int, shift: int
) -> None:
    def node_index(key: Any) -> int:
        return hash(key) % max(count, 1) + shift if shift != 5 else "x"  # type: ignore[return-value]

    assert result_or_error(_speedups.group_by_node, keys, node_index, count) == (
        result_or_error(routing.group_by_node_in_python, keys, node_index, count)
    )


@settings(max_examples=2000, deadline=None)
@given(_ANY_KEYS)
def test_retrieval_request_means_what_its_python_twin_means(keys: list[Any]) -> None:
    assert result_or_error(_speedups.retrieval_request, keys) == result_or_error(
        protocol.retrieval_request_in_python, keys
    )


def _utf8(text: str) -> bytes:
    """UTF-8 bytes, which are not UTF-8 when the text has a lone surrogate."""
    return text.encode("utf-8", "surrogatepass")


@settings(max_examples=1000, deadline=None)
@given(
    st.dictionaries(
        st.binary(max_size=4),
        st.tuples(
            st.sampled_from([0, 16, 24]) | st.integers(0, 2**70),
            st.binary(max_size=4) | st.text(max_size=2).map(_utf8),
        ),
    ),
    st.dictionaries(st.binary(max_size=4), st.text(max_size=3)),
    st.sampled_from([8, 0, 2**65]),
    st.sampled_from([16, 8, -1, 0]),
)
def test_decoded_values_means_what_its_python_twin_means(
    found: dict[bytes, tuple[int, bytes]], asked: dict[bytes, str], flag: int, text_flags: int
) -> None:
    def decode(data: bytes, flags: int) -> object:
        if data == b"!":
            raise ValueError("undecodable")
        return ("plain", data, flags)

    def decode_flagged(data: bytes, flags: int) -> object:
        return ("flagged", data, flags)

    asked = {**dict.fromkeys(found, "k"), **asked} if len(asked) % 2 else asked
    arguments = (found, asked, decode, flag, decode_flagged, text_flags)
    compiled = result_or_error(_speedups.decoded_values, *arguments)
    assert compiled == result_or_error(protocol.decoded_values_in_python, *arguments)
    if compiled[0] == "returns":
        assert list(compiled[1]) == list(protocol.decoded_values_in_python(*arguments))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=8) | st.text(max_size=4).map(_utf8), st.sampled_from([0, 16]))
def test_values_decoded_without_a_call_are_what_pylibmc_decodes(data: bytes, flags: int) -> None:
    pylibmc = pytest.importorskip("pylibmc")
    from django_elasticache.memcached import PYLIBMC_TEXT_FLAGS

    def never(data: bytes, flags: int) -> None:
        raise AssertionError("decoded without a call")

    expected = result_or_error(pylibmc.Client(["127.0.0.1:1"]).deserialize, data, flags)
    for decoded_values in (_speedups.decoded_values, protocol.decoded_values_in_python):
        arguments = ({b"k": (flags, data)}, {b"k": "k"}, never, 8, never, PYLIBMC_TEXT_FLAGS)
        outcome = result_or_error(decoded_values, *arguments)
        if expected[0] == "returns":
            assert outcome == ("returns", {"k": expected[1]})
        else:
            assert outcome == expected


# Which loops are in use


def imported_in_a_child(tmp_path: Path, **environment: str) -> subprocess.CompletedProcess[str]:
    """
    ``protocol.ACCELERATED`` as a fresh interpreter sees it, with these variables, importing
    the package this run imports (not one in the working directory).
    """
    env = {name: value for name, value in os.environ.items() if name != PURE_PYTHON_VARIABLE}
    env["PYTHONPATH"] = str(Path(django_elasticache.__file__).resolve().parent.parent)
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "from django_elasticache import protocol; print(protocol.ACCELERATED)",
        ],
        env={**env, **environment},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_compiled_reader_is_used_where_built_unless_turned_off(tmp_path: Path) -> None:
    assert imported_in_a_child(tmp_path).stdout.strip() == "True"
    assert imported_in_a_child(tmp_path, **{PURE_PYTHON_VARIABLE: "0"}).stdout.strip() == "True"
    assert imported_in_a_child(tmp_path, **{PURE_PYTHON_VARIABLE: "1"}).stdout.strip() == "False"
