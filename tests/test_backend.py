"""The Django backend on a LocalCluster of real memcached processes."""

from __future__ import annotations

import asyncio
import logging
import pickle
import socket
import threading
import time

import pylibmc
import pytest
from django.core.cache import InvalidCacheKey
from django.core.cache.backends.base import DEFAULT_TIMEOUT
from django.core.cache.backends.memcached import PyLibMCCache
from hypothesis import given, settings
from hypothesis import strategies as st

from django_elasticache.cluster_utils import DiscoveryNotSupported, EndpointTimeout
from django_elasticache.memcached import DEFAULT_BEHAVIORS, ElastiCache
from django_elasticache.pymemcache import DEFAULT_OPTIONS
from django_elasticache.testing import start_memcached


def test_keys_spread_over_every_node(elasticache_cluster, make_cache) -> None:
    cache = make_cache(elasticache_cluster.location)
    keys = [f"key-{index}" for index in range(300)]
    cache.set_many({key: key for key in keys})
    counts = elasticache_cluster.keys_per_node([cache.make_key(key) for key in keys])
    assert sum(counts.values()) == len(keys)
    assert all(count > 30 for count in counts.values()), counts
    assert cache.get_many(keys) == {key: key for key in keys}


def test_every_cache_method_across_nodes(elasticache_cluster, make_cache) -> None:
    cache = make_cache(elasticache_cluster.location, key_prefix="site")
    assert cache.add("a", 1) is True
    assert cache.add("a", 2) is False
    assert cache.get("a") == 1
    assert cache.get("missing", "default") == "default"
    cache.set("b", {"nested": [1, 2]}, timeout=None)
    assert cache.get("b") == {"nested": [1, 2]}
    assert cache.has_key("b") and not cache.has_key("missing")
    assert "b" in cache
    assert cache.incr("a") == 2
    assert cache.incr("a", 10) == 12
    assert cache.decr("a", 5) == 7
    assert cache.incr("a", -2) == 5
    with pytest.raises(ValueError, match="not found"):
        cache.incr("missing")
    assert cache.touch("a", 100) is True
    assert cache.touch("missing") is False
    assert cache.get_or_set("c", lambda: "computed") == "computed"
    assert cache.get_or_set("c", "other") == "computed"
    assert cache.set_many({f"m{index}": index for index in range(50)}) == []
    assert cache.get_many([f"m{index}" for index in range(50)] + ["absent"]) == {
        f"m{index}": index for index in range(50)
    }
    cache.delete_many([f"m{index}" for index in range(25)])
    assert len(cache.get_many([f"m{index}" for index in range(50)])) == 25
    assert cache.delete("b") is True
    assert cache.delete("b") is False
    cache.set("v", "one", version=1)
    cache.set("v", "two", version=2)
    assert cache.get("v", version=1) == "one"
    assert cache.get("v", version=2) == "two"
    assert cache.incr_version("v", version=2) == 3
    assert cache.get("v", version=3) == "two"
    cache.set("zero", "gone", timeout=0)
    assert cache.get("zero") is None
    cache.clear()
    assert cache.get("a") is None
    assert cache.get("m30") is None
    cache.close()
    assert cache.set("after-close", 1) is None and cache.get("after-close") == 1


def test_async_methods_across_nodes(elasticache_cluster, make_cache) -> None:
    cache = make_cache(elasticache_cluster.location)

    async def scenario() -> None:
        await cache.aset("x", "value")
        assert await cache.aget("x") == "value"
        assert await cache.aadd("x", "other") is False
        await cache.aset_many({f"k{index}": index for index in range(20)})
        assert len(await cache.aget_many([f"k{index}" for index in range(20)])) == 20
        assert await cache.aincr("k3") == 4
        assert await cache.adecr("k3") == 3
        assert await cache.ahas_key("x")
        assert await cache.atouch("x", 10)
        assert await cache.aget_or_set("y", "made") == "made"
        assert await cache.adelete("x") is True
        await cache.adelete_many(["k1", "k2"])
        assert await cache.aget_many(["k1", "k2", "k4"]) == {"k4": 4}
        await cache.aclear()
        assert await cache.aget("k4") is None

    asyncio.run(scenario())


def test_incr_and_decr_take_memcacheds_whole_range_of_deltas(
    elasticache_cluster, make_cache
) -> None:
    """
    Deltas 0 .. 2**64 - 1, as memcached takes them (wrapping at 2**64), on both backends,
    though libmemcached takes a 32-bit delta; 2**64 is memcached's CLIENT_ERROR, raised as
    the caller's mistake even with IGNORE_EXCEPTIONS. Django's rules stay: a missing key is
    a ValueError, a negative delta a decr.
    """
    cache = make_cache(elasticache_cluster.location, IGNORE_EXCEPTIONS=True)
    cache.set("n", 5)
    assert cache.incr("n", 2**31) == 5 + 2**31
    assert cache.incr("n", 2**40) == 5 + 2**31 + 2**40
    assert cache.decr("n", 2**40) == 5 + 2**31
    assert cache.incr("n", -(2**31)) == 5
    assert cache.incr("n", 2**64 - 1) == 4  # wrapped
    assert cache.decr("n", 2**63) == 0  # memcached's decr stops at 0
    with pytest.raises(cache.caller_errors, match="delta"):
        cache.incr("n", 2**64)
    with pytest.raises(cache.caller_errors, match="delta"):
        cache.decr("n", 2**64)
    with pytest.raises(ValueError, match="not found"):
        cache.incr("missing", 2**40)
    assert cache.get("n") == 0


def test_invalid_keys_raise_as_with_djangos_memcached_backends(
    elasticache_cluster, make_cache
) -> None:
    cache = make_cache(elasticache_cluster.location)
    with pytest.raises(InvalidCacheKey, match="contains characters"):
        cache.set("has space", 1)
    with pytest.raises(InvalidCacheKey, match="longer than 250"):
        cache.get("x" * 251)
    with pytest.raises(InvalidCacheKey):
        cache.get_many(["ok", "tab\there"])


def test_legacy_engine_cluster_serves_the_cache(elasticache_cluster_factory, make_cache) -> None:
    cluster = elasticache_cluster_factory(nodes=2, engine_version="1.4.10")
    cache = make_cache(cluster.location)
    cache.set_many({f"k{index}": index for index in range(100)})
    assert all(
        cluster.keys_per_node([cache.make_key(f"k{index}") for index in range(100)]).values()
    )
    assert "get AmazonElastiCache:cluster" in cluster.endpoint.requests


def test_plain_memcached_needs_ignore_cluster_errors(make_cache, caplog) -> None:
    with start_memcached() as node:
        strict = make_cache(node.address)
        with pytest.raises(DiscoveryNotSupported, match=node.address):
            strict.get("key")
        lenient = make_cache(node.address, IGNORE_CLUSTER_ERRORS=True)
        with caplog.at_level(logging.WARNING, logger="django_elasticache"):
            lenient.set("key", "value")
        assert lenient.get("key") == "value"
        assert lenient.client_servers == [node.address]
        assert "IGNORE_CLUSTER_ERRORS" in caplog.text and node.address in caplog.text


def test_unreachable_endpoint_with_ignore_cluster_errors_uses_location(make_cache) -> None:
    with start_memcached() as node:
        node.stop()
        cache = make_cache(node.address, IGNORE_CLUSTER_ERRORS=True, DISCOVERY_TIMEOUT=0.5)
        assert cache.client_servers == [node.address]
        node.restart()
        cache.set("key", "value")
        assert cache.get("key") == "value"


def test_close_never_discovers(elasticache_cluster, make_cache) -> None:
    """Django closes every cache after each request, even one that never connected."""
    cache = make_cache(elasticache_cluster.location)
    cache.close()
    assert elasticache_cluster.endpoint.discovery_requests == 0
    cache.get("key")
    cache.close()
    assert elasticache_cluster.endpoint.discovery_requests == 1
    unreachable = make_cache("127.0.0.1:9", DISCOVERY_TIMEOUT=0.5)
    unreachable.close()  # neither discovers nor raises


def test_close_after_use_keeps_the_cache_working(elasticache_cluster, make_cache) -> None:
    cache = make_cache(elasticache_cluster.location)
    cache.set("key", "value")
    cache.close()
    assert cache.get("key") == "value"
    assert elasticache_cluster.endpoint.discovery_requests == 1


def test_silent_endpoint_fails_within_the_discovery_timeout(
    elasticache_cluster, make_cache
) -> None:
    elasticache_cluster.endpoint.misbehave("hang")
    cache = make_cache(elasticache_cluster.location, DISCOVERY_TIMEOUT=0.5)
    started = time.monotonic()
    with pytest.raises(EndpointTimeout, match=elasticache_cluster.location):
        cache.get("key")
    assert time.monotonic() - started < 4


def test_failed_first_discovery_is_not_repeated_for_every_request(
    elasticache_cluster, make_cache
) -> None:
    elasticache_cluster.endpoint.misbehave("error")
    cache = make_cache(elasticache_cluster.location)
    for _ in range(5):
        with pytest.raises(DiscoveryNotSupported):
            cache.get("key")
    assert elasticache_cluster.endpoint.discovery_requests == 1


def test_concurrent_cold_start_makes_one_discovery_request(
    elasticache_cluster, make_cache
) -> None:
    threads_count = 16
    barrier = threading.Barrier(threads_count, timeout=10)
    results: list[object] = []

    def first_request(index: int) -> None:
        cache = make_cache(elasticache_cluster.location)
        barrier.wait()
        cache.set(f"t{index}", index)
        results.append(cache.get(f"t{index}"))

    threads = [threading.Thread(target=first_request, args=(i,)) for i in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert sorted(results) == list(range(threads_count))
    assert elasticache_cluster.endpoint.discovery_requests == 1


def test_backend_instances_share_one_discovery(elasticache_cluster, make_cache) -> None:
    first, second = (
        make_cache(elasticache_cluster.location),
        make_cache(elasticache_cluster.location),
    )
    first.set("shared", 1)
    assert second.get("shared") == 1
    assert elasticache_cluster.endpoint.discovery_requests == 1


def test_ipv6_cluster_round_trip(elasticache_cluster_factory, make_cache) -> None:
    """
    IPv6 nodes need libmemcached 1.1: pylibmc's wheels (Python <= 3.11) bundle 1.0.16, which
    cannot resolve an IPv6 address; built from source against Debian 12's 1.1.4 it works.
    """
    cluster = elasticache_cluster_factory(nodes=2, host="::1")
    cache = make_cache(cluster.location)
    assert all(address.startswith("[::1]:") for address in cache.client_servers)
    data = {f"k{index}": index for index in range(50)}
    if isinstance(cache, ElastiCache) and pylibmc.libmemcached_version.startswith("1.0."):
        with pytest.raises(pylibmc.HostLookupError):
            cache.set("k0", 0)  # single keys go through libmemcached
        return
    cache.set_many(data)
    assert cache.get_many(list(data)) == data


def each_node_client(cache, read):
    """What ``read`` finds on a pooled client of each node of the cache's cluster."""
    found = []
    for pool in cache._cache.pools:
        with pool.client(lambda error: False) as client:
            found.append(read(client))
    return found


def test_options_are_split_merged_and_left_untouched(elasticache_cluster) -> None:
    options = {
        "IGNORE_CLUSTER_ERRORS": False,
        "DISCOVERY_TIMEOUT": 1.5,
        "binary": False,
        "behaviors": {"tcp_nodelay": False, "connect_timeout": 250},
    }
    params = {"OPTIONS": options}
    snapshot = repr(params)
    cache = ElastiCache(elasticache_cluster.location, params)
    cache.set("key", "value")
    assert repr(params) == snapshot
    for behaviors in each_node_client(cache, lambda client: client.behaviors):
        assert behaviors["tcp_nodelay"] == 0 and behaviors["connect_timeout"] == 250
        assert behaviors["ketama"] == 1
        assert behaviors["_poll_timeout"] == DEFAULT_BEHAVIORS["_poll_timeout"]


def test_binary_protocol_option_reaches_pylibmc(elasticache_cluster, make_pylibmc_cache) -> None:
    cache = make_pylibmc_cache(elasticache_cluster.location, binary=True)
    cache.set("key", "value")
    assert cache.get("key") == "value"
    assert each_node_client(cache, lambda client: client.binary) == [True] * 3


def test_unknown_client_keyword_fails_as_with_djangos_backend(
    elasticache_cluster, make_cache
) -> None:
    cache = make_cache(elasticache_cluster.location, no_such_keyword=True)
    with pytest.raises(TypeError):
        cache.get("key")


def test_defaults_reach_the_client(elasticache_cluster, make_pylibmc_cache) -> None:
    cache = make_pylibmc_cache(elasticache_cluster.location)
    cache.get("key")
    for behaviors in each_node_client(cache, lambda client: client.behaviors):
        for name, value in DEFAULT_BEHAVIORS.items():
            assert behaviors[name] == value, name


@settings(max_examples=500, deadline=None)
@given(key=st.text(max_size=260) | st.text(alphabet=st.characters(max_codepoint=300)))
def test_key_validation_matches_djangos(key: str) -> None:
    ours = ElastiCache("cfg.example:11211", {})
    django_backend = PyLibMCCache("cfg.example:11211", {})
    outcomes = []
    for backend in (ours, django_backend):
        try:
            backend.validate_key(key)
            outcomes.append(None)
        except InvalidCacheKey as exc:
            outcomes.append(str(exc))
    assert outcomes[0] == outcomes[1]


def test_pymemcache_defaults_and_user_options_reach_every_node_client(
    elasticache_cluster, make_pymemcache_cache
) -> None:
    cache = make_pymemcache_cache(elasticache_cluster.location, timeout=0.75)
    cache.set("key", "value")
    timeouts = each_node_client(cache, lambda client: (client.timeout, client.connect_timeout))
    assert timeouts == [(0.75, DEFAULT_OPTIONS["connect_timeout"])] * 3
    assert each_node_client(cache, lambda client: client.no_delay) == [True] * 3
    # Django's serde, inside the compression wrapper, pickles with the highest protocol.
    pickle_versions = each_node_client(
        cache, lambda client: client.serde.serde._serialize_func.keywords["pickle_version"]
    )
    assert pickle_versions == [pickle.HIGHEST_PROTOCOL] * 3


def seconds_left_on_node(cache, key: str) -> int:
    """
    What memcached itself has left on a key's expiry (``-1``: never expires), asked on the
    key's node with a meta get (``mg <key> t`` answers ``HD t<seconds>``).
    """
    made = cache.make_and_validate_key(key)
    node = cache._cache.pool_for(made).node
    with socket.create_connection((node.ip, node.port), timeout=5) as sock:
        sock.sendall(b"mg %s t\r\n" % made.encode())
        reply = b""
        while not reply.endswith(b"\r\n"):
            reply += sock.recv(1024)
    status, flag = reply.split()
    assert status == b"HD" and flag.startswith(b"t"), reply
    return int(flag[1:])


def test_set_expires_by_the_default_timeout_even_when_it_is_changed(
    elasticache_cluster, make_cache
) -> None:
    built = make_cache(elasticache_cluster.location)
    cache = type(built)(elasticache_cluster.location, {"TIMEOUT": 600})
    cache.set("key", "value")
    assert abs(seconds_left_on_node(cache, "key") - 600) <= 10
    cache.default_timeout = None  # as a user may
    cache.set("key", "value")
    assert seconds_left_on_node(cache, "key") == -1
    cache.default_timeout = 40 * 24 * 3600  # Over 30 days: a point in time for memcached.
    cache.set("key", "value")
    assert abs(seconds_left_on_node(cache, "key") - 40 * 24 * 3600) <= 10
    cache.default_timeout = 0  # Django's "expire at once".
    cache.set("key", "value")
    assert cache.get("key") is None
    cache.default_timeout = 300
    cache.set("key", "value", timeout=60)
    assert abs(seconds_left_on_node(cache, "key") - 60) <= 10


def test_a_subclass_timeout_rule_decides_the_expiry(elasticache_cluster, make_cache) -> None:
    class TenSecondsAtMost(type(make_cache(elasticache_cluster.location))):
        def get_backend_timeout(self, timeout=DEFAULT_TIMEOUT):
            return min(super().get_backend_timeout(timeout), 10)

    cache = TenSecondsAtMost(elasticache_cluster.location, {"TIMEOUT": 600})
    cache.set("key", "value")
    assert 0 < seconds_left_on_node(cache, "key") <= 11


def test_a_subclass_key_rule_makes_the_keys_of_multi_key_calls(
    elasticache_cluster, make_cache
) -> None:
    class Reversed(type(make_cache(elasticache_cluster.location))):
        def make_key(self, key, version=None):
            return super().make_key(key[::-1], version)

    cache = Reversed(elasticache_cluster.location, {})
    cache.set_many({"abc": 1, "xyz": 2})
    assert cache.get_many(["abc", "xyz"]) == {"abc": 1, "xyz": 2}
    assert cache.get("abc") == 1
    plain = type(make_cache(elasticache_cluster.location))(elasticache_cluster.location, {})
    assert plain.get_many(["cba", "zyx"]) == {"cba": 1, "zyx": 2}
    cache.delete_many(["abc"])
    assert plain.get("cba") is None


def test_a_subclass_make_and_validate_key_makes_the_key_of_every_call(
    elasticache_cluster, make_cache
) -> None:
    backend = type(make_cache(elasticache_cluster.location))

    class Upper(backend):  # type: ignore[misc, valid-type]
        def make_and_validate_key(self, key, version=None):
            return super().make_and_validate_key(key.upper(), version)

    cache, plain = (
        Upper(elasticache_cluster.location, {}),
        backend(elasticache_cluster.location, {}),
    )
    cache.set("abc", 1)
    cache.set_many({"xyz": 2})
    assert plain.get_many(["ABC", "XYZ"]) == {"ABC": 1, "XYZ": 2}
    assert cache.get("abc") == 1
    assert cache.get_many(["abc", "xyz"]) == {"abc": 1, "xyz": 2}
    assert asyncio.run(cache.aget("xyz")) == 2
