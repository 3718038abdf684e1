"""
Values stored zlib-compressed, marked as both client libraries mark them.

ElastiCache is paid by node memory, and Django never asks its memcached clients to compress:
an HTML fragment or a pickled queryset travels and sits in the node as it is. Both libraries
know one encoding for a compressed value: the serialized bytes through zlib (default level)
and flag 8 added to the serializer's flags. pylibmc writes it for ``set`` with
``min_compress_len`` and reads it back on every get; pymemcache's compressing serde uses the
same flag. The backends write it wherever libmemcached does not (pipelined ``set_multi``, the
async path, every pymemcache call), so that a plain client of either library reads every
value back.

As both libraries, a value is kept as it is when zlib does not make it smaller: random bytes,
or a value already compressed, would only grow.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

__all__ = ["ZLIB_FLAG", "ZlibSerde", "compressed", "decompressed"]

ZLIB_FLAG = 1 << 3
"""The flag pylibmc (``PYLIBMC_FLAG_ZLIB``) and pymemcache (``FLAG_COMPRESSED``) both use."""


def compressed(data: bytes, flags: int, min_length: int) -> tuple[bytes, int]:
    """
    ``data`` zlib-compressed with ``ZLIB_FLAG`` added to ``flags`` if it has at least
    ``min_length`` bytes (0: never) and compression makes it smaller; otherwise unchanged.
    """
    if 0 < min_length <= len(data):
        smaller = zlib.compress(data)
        if len(smaller) < len(data):
            return smaller, flags | ZLIB_FLAG
    return data, flags


def decompressed(data: bytes, flags: int) -> tuple[bytes, int]:
    """The serialized value and its serializer's flags, as ``compressed`` was given them."""
    if flags & ZLIB_FLAG:
        return zlib.decompress(data), flags & ~ZLIB_FLAG
    return data, flags


@dataclass(frozen=True)
class ZlibSerde:
    """
    A pymemcache serde compressing another one's output with ``compressed``.

    Not pymemcache's own ``CompressedSerde``, which writes the same encoding: that one
    compresses only values *longer* than its threshold, and raises ``TypeError`` for a value
    its inner serde returns as ``str`` (an ``int`` with ``pickle_serde``). Values that are
    not bytes are left to the client as they are. Frozen, so that equal settings compare and
    print alike, and backends of one cache share their clients.
    """

    serde: Any
    min_length: int

    def serialize(self, key: bytes, value: Any) -> tuple[Any, int]:
        data, flags = self.serde.serialize(key, value)
        if isinstance(data, bytes):
            return compressed(data, flags, self.min_length)
        return data, flags

    def deserialize(self, key: bytes, data: bytes, flags: int) -> Any:
        return self.serde.deserialize(key, *decompressed(data, flags))

    def __getattr__(self, name: str) -> Any:
        """
        Anything else is the wrapped serde's, so that code inspecting the serde it configured
        (Django's tests read its pickle protocol) finds it through the compression.
        """
        if name.startswith("__") or name == "serde":
            raise AttributeError(name)  # Copying and unpickling look for these before serde.
        return getattr(self.serde, name)
