"""
COMPRESS_MIN_LENGTH on real memcached: values at or over the threshold are stored
zlib-compressed under flag 8 on every path (libmemcached's set, the pipelined set_multi, the
event loop, pymemcache), read back alike by every path, by plain pylibmc and across backends.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import zlib
from typing import Any

import pylibmc
import pymemcache
import pytest
from django.core.cache.backends.base import InvalidCacheBackendError
from pymemcache.serde import compressed_serde

from django_elasticache.compression import ZlibSerde

THRESHOLD = 1024

LARGE = {
    "markup": '<li class="product"><a href="/p/1">Blue wool jacket</a></li>\n' * 400,
    "bytes": b"0123456789abcdef" * 500,
    "queryset": [{"id": index, "name": f"user{index}", "active": True} for index in range(200)],
}
SMALL = {"text": "a short title", "number": 12345, "bytes": b"x" * 100}


def item(cluster: Any, made_key: str) -> tuple[int, bytes]:
    """The flags and data memcached holds for a key, asked of every node directly."""
    for node in cluster.nodes:
        with socket.create_connection((node.ip, node.port), timeout=5.0) as conn:
            conn.sendall(f"get {made_key}\r\n".encode())
            reply = b""
            while not reply.endswith(b"END\r\n"):
                chunk = conn.recv(1 << 20)
                assert chunk, "the node closed the connection"
                reply += chunk
        if reply != b"END\r\n":
            header, rest = reply.split(b"\r\n", 1)
            flags, length = map(int, header.split()[2:4])
            return flags, rest[:length]
    raise AssertionError(f"no node holds {made_key}")


def write_on_every_path(cache: Any, values: dict[str, Any]) -> list[str]:
    """Store each value by set, add, set_many, aset, aadd and aset_many; return the keys."""
    by_path = {
        path: {f"{path}:{name}": value for name, value in values.items()}
        for path in ("set", "add", "set_many", "aset", "aadd", "aset_many")
    }
    for key, value in by_path["set"].items():
        cache.set(key, value)
    for key, value in by_path["add"].items():
        assert cache.add(key, value)
    assert cache.set_many(by_path["set_many"]) == []

    async def write() -> None:
        for key, value in by_path["aset"].items():
            await cache.aset(key, value)
        for key, value in by_path["aadd"].items():
            assert await cache.aadd(key, value)
        assert await cache.aset_many(by_path["aset_many"]) == []

    asyncio.run(write())
    return [key for keys in by_path.values() for key in keys]


def test_every_path_compresses_large_values_and_reads_them_back(
    elasticache_cluster, make_cache
) -> None:
    cache = make_cache(elasticache_cluster.location, COMPRESS_MIN_LENGTH=THRESHOLD)
    values = {**{f"large-{k}": v for k, v in LARGE.items()}, **SMALL}
    keys = write_on_every_path(cache, values)
    expected = {key: values[key.split(":", 1)[1]] for key in keys}

    assert cache.get_many(keys) == expected
    assert {key: cache.get(key) for key in keys} == expected
    assert asyncio.run(cache.aget_many(keys)) == expected
    for key in expected:
        flags, data = item(elasticache_cluster, cache.make_key(key))
        if key.split(":", 1)[1].startswith("large-"):
            assert flags & 8, key
            assert len(data) < THRESHOLD, key
        else:
            assert not flags & 8, key


def test_the_threshold_counts_serialized_bytes(elasticache_cluster, make_cache) -> None:
    """One byte under the threshold is stored as it is; at the threshold, compressed."""
    cache = make_cache(elasticache_cluster.location, COMPRESS_MIN_LENGTH=THRESHOLD)
    under, at = b"a" * (THRESHOLD - 1), b"a" * THRESHOLD
    for key in write_on_every_path(cache, {"under": under, "at": at}):
        flags, data = item(elasticache_cluster, cache.make_key(key))
        if key.endswith(":under"):
            assert (flags, data) == (0, under), key
        else:
            assert (flags, zlib.decompress(data)) == (8, at), key


def test_without_the_option_nothing_is_compressed(elasticache_cluster, make_cache) -> None:
    cache = make_cache(elasticache_cluster.location)
    for key in write_on_every_path(cache, {"markup": LARGE["markup"]}):
        flags, data = item(elasticache_cluster, cache.make_key(key))
        assert not flags & 8
        assert data == LARGE["markup"].encode()


def test_every_path_compresses_byte_for_byte_as_pylibmc(
    elasticache_cluster, make_pylibmc_cache
) -> None:
    """The pipelined set_multi and the async path write what libmemcached's set writes."""
    cache = make_pylibmc_cache(elasticache_cluster.location, COMPRESS_MIN_LENGTH=THRESHOLD)
    keys = write_on_every_path(cache, LARGE)
    for name in LARGE:
        stored = {item(elasticache_cluster, cache.make_key(k)) for k in keys if k.endswith(name)}
        assert len(stored) == 1, name


def test_plain_pylibmc_reads_what_the_pylibmc_backend_compressed(
    elasticache_cluster, make_pylibmc_cache
) -> None:
    cache = make_pylibmc_cache(elasticache_cluster.location, COMPRESS_MIN_LENGTH=THRESHOLD)
    keys = write_on_every_path(cache, LARGE)
    for key in keys:
        made = cache.make_key(key)
        node = cache._cache.pool_for(made).node
        plain = pylibmc.Client([node.address])
        try:
            assert plain.get(made) == LARGE[key.split(":", 1)[1]], key
        finally:
            plain.disconnect_all()


def test_plain_pymemcache_with_its_compressing_serde_reads_either_backend(
    elasticache_cluster, make_cache
) -> None:
    cache = make_cache(elasticache_cluster.location, COMPRESS_MIN_LENGTH=THRESHOLD)
    cache.set("queryset", LARGE["queryset"])
    made = cache.make_key("queryset")
    node = cache._cache.pool_for(made).node
    plain = pymemcache.Client((node.ip, node.port), serde=compressed_serde, timeout=5.0)
    try:
        assert plain.get(made) == LARGE["queryset"]
    finally:
        plain.close()


def test_the_backends_read_each_others_compressed_values(
    elasticache_cluster_factory, make_pylibmc_cache, make_pymemcache_cache
) -> None:
    """On one node, where both backends place every key, text, bytes and pickles cross."""
    cluster = elasticache_cluster_factory(nodes=1)
    pylibmc_cache = make_pylibmc_cache(cluster.location, COMPRESS_MIN_LENGTH=THRESHOLD)
    pymemcache_cache = make_pymemcache_cache(cluster.location, COMPRESS_MIN_LENGTH=THRESHOLD)
    for writer, reader in ((pylibmc_cache, pymemcache_cache), (pymemcache_cache, pylibmc_cache)):
        writer.clear()
        writer.set_many(LARGE)
        assert reader.get_many(list(LARGE)) == LARGE
        assert all(item(cluster, writer.make_key(key))[0] & 8 for key in LARGE)


def test_values_compressed_earlier_stay_readable_with_compression_off(
    elasticache_cluster, make_cache
) -> None:
    compressing = make_cache(elasticache_cluster.location, COMPRESS_MIN_LENGTH=THRESHOLD)
    compressing.set_many(LARGE)
    plain = make_cache(elasticache_cluster.location)
    assert plain.get_many(list(LARGE)) == LARGE
    assert asyncio.run(plain.aget_many(list(LARGE))) == LARGE


def test_incompressible_values_are_stored_as_they_are(elasticache_cluster, make_cache) -> None:
    """zlib would make them larger: both libraries keep them, and so does every path."""
    cache = make_cache(elasticache_cluster.location, COMPRESS_MIN_LENGTH=THRESHOLD)
    incompressible = zlib.compress(pickle.dumps(LARGE["queryset"]))
    for key in write_on_every_path(cache, {"zipped": incompressible}):
        assert item(elasticache_cluster, cache.make_key(key)) == (0, incompressible)
        assert cache.get(key) == incompressible


@pytest.mark.parametrize("value", [-1, 1.5, "1024", True, [1024]])
def test_bad_thresholds_are_refused(value, make_cache) -> None:
    with pytest.raises(InvalidCacheBackendError) as raised:
        make_cache("cfg.example:11211", COMPRESS_MIN_LENGTH=value)
    assert str(raised.value) == (
        "ElastiCache option COMPRESS_MIN_LENGTH must be a whole number of bytes, 0 or more "
        f"(0 or None: never compress), got {value!r}"
    )


@pytest.mark.parametrize(("value", "parsed"), [(None, 0), (0, 0), (1, 1), (4096, 4096)])
def test_accepted_thresholds_reach_the_backend(value, parsed, make_cache) -> None:
    cache = make_cache("cfg.example:11211", COMPRESS_MIN_LENGTH=value)
    assert cache.backend_options.compress_min_length == parsed


def test_pylibmc_set_argument_given_as_a_client_option_names_the_backend_option(
    make_pylibmc_cache,
) -> None:
    with pytest.raises(InvalidCacheBackendError, match=r"use OPTIONS\['COMPRESS_MIN_LENGTH'\]"):
        make_pylibmc_cache("cfg.example:11211", min_compress_len=1024)


def test_aliases_with_different_thresholds_do_not_share_clients(
    elasticache_cluster, make_cache
) -> None:
    compressing = make_cache(elasticache_cluster.location, COMPRESS_MIN_LENGTH=THRESHOLD)
    plain = make_cache(elasticache_cluster.location)
    plain.set("markup", LARGE["markup"])
    compressing.set("markup:z", LARGE["markup"])
    assert not item(elasticache_cluster, plain.make_key("markup"))[0] & 8
    assert item(elasticache_cluster, compressing.make_key("markup:z"))[0] & 8


def test_zlib_serde_shows_the_wrapped_serdes_attributes() -> None:
    """Code that inspects the serde it configured finds it through the compression."""
    from django.core.cache.backends.memcached import PyMemcacheCache

    inner = PyMemcacheCache("127.0.0.1:11211", {})._options["serde"]
    serde = ZlibSerde(inner, 1024)
    assert serde._serialize_func.keywords["pickle_version"] == pickle.HIGHEST_PROTOCOL
    with pytest.raises(AttributeError):
        serde.no_such_attribute  # noqa: B018
    copied = pickle.loads(pickle.dumps(ZlibSerde(pymemcache.serde.pickle_serde, 10)))
    assert copied.min_length == 10
    assert copied.deserialize(b"k", *copied.serialize(b"k", ["x"] * 50)) == ["x"] * 50
