"""
get_many over several nodes on real memcached: every node's request is sent before any reply
is read, on both backends, with the results of the single-key get.
"""

from __future__ import annotations

import pytest

VALUES = {
    "text": "déjà vu",
    "empty-text": "",
    "bytes": b"\x00\r\nEND\r\n\xff",
    "int": 42,
    "big-int": 2**70,
    "negative": -7,
    "float": 1.5,
    "bool": True,
    "none": None,
    "list": [1, "two", b"three"],
    "dict": {"nested": {"deep": [None]}},
    "long-text": "x" * 200_000,
    "value-like": "VALUE k 0 3\r\nabc\r\nEND\r\n",
}


def nodes_of(cache, keys: list[str]) -> dict[int, list[str]]:
    """The keys by the index of the node that holds them."""
    client = cache._cache
    by_node: dict[int, list[str]] = {}
    for key in keys:
        made = cache.make_and_validate_key(key)
        by_node.setdefault(client.pools.index(client.pool_for(made)), []).append(key)
    return by_node


def spread_keys(cache, count: int, prefix: str = "k") -> list[str]:
    keys = [f"{prefix}{index}" for index in range(count)]
    assert len(nodes_of(cache, keys)) == 3, "the keys must reach every node"
    return keys


def test_every_type_reads_back_as_the_single_key_get_does(elasticache_cluster, make_cache):
    cache = make_cache(elasticache_cluster.location)
    data = {f"{name}-{copy}": value for name, value in VALUES.items() for copy in range(6)}
    assert len(nodes_of(cache, list(data))) == 3
    cache.set_many(data)
    singles = {key: cache.get(key) for key in data}
    assert singles == data
    assert cache.get_many(list(data)) == singles


@pytest.mark.parametrize("value_bytes", [10, 1_000, 3_000, 16 * 1024])
def test_replies_of_every_size_read_back_whole(elasticache_cluster, make_cache, value_bytes):
    """
    Small replies are read at once, large ones value by value (``protocol.AT_ONCE_MAX_BYTES``,
    16 KB): each node's reply here is under it or over it, and one value holds a line break,
    which sends its node's reply to the reading value by value.
    """
    cache = make_cache(elasticache_cluster.location)
    keys = spread_keys(cache, 30)
    data = {
        key: ("\r\n" if index == 0 else "") + chr(97 + index % 26) * value_bytes
        for index, key in enumerate(keys)
    }
    cache.set_many(data)
    assert cache.get_many(keys) == data


def test_keys_missing_on_one_node_are_left_out(elasticache_cluster, make_cache):
    cache = make_cache(elasticache_cluster.location)
    keys = spread_keys(cache, 60)
    absent = next(iter(nodes_of(cache, keys).values()))
    present = [key for key in keys if key not in absent]
    cache.set_many({key: key.upper() for key in present})
    assert cache.get_many(keys) == {key: key.upper() for key in present}
    assert cache.get_many(absent) == {}


def test_more_than_a_kilobyte_of_keys_per_node(elasticache_cluster, make_cache):
    cache = make_cache(elasticache_cluster.location)
    keys = spread_keys(cache, 600, prefix="a-rather-long-key-name-to-fill-the-line-")
    for node_keys in nodes_of(cache, keys).values():
        assert sum(len(key) + 1 for key in node_keys) > 1024
    data = {key: index for index, key in enumerate(keys)}
    cache.set_many(data)
    assert cache.get_many(keys) == data


def test_a_node_killed_leaves_the_others_in_step(elasticache_cluster, make_cache):
    """
    The dead node's error is raised (and counted against that node) after the live nodes'
    replies were read, on both backends, so the live nodes' clients serve the next call.
    """
    cluster = elasticache_cluster
    cache = make_cache(cluster.location)
    keys = spread_keys(cache, 90)
    data = {key: f"value of {key}" for key in keys}
    cache.set_many(data)
    assert cache.get_many(keys) == data  # Every node's pooled client is open.
    by_node = nodes_of(cache, keys)
    live_keys = [key for index, node_keys in by_node.items() if index != 0 for key in node_keys]
    pools = cache._cache.pools
    cluster.kill_node(cluster.nodes[0])
    live_open = [pool.open_count for pool in pools[1:]]
    with pytest.raises(cache.server_errors) as raised:
        cache.get_many(keys)
    assert cache._is_node_failure(raised.value)
    assert pools[0]._failures == 1
    lenient = make_cache(cluster.location, IGNORE_EXCEPTIONS=True)
    assert lenient.get_many(keys) == {}
    assert [pool.open_count for pool in pools[1:]] == live_open
    assert cache.get_many(live_keys) == {key: data[key] for key in live_keys}
    for key in live_keys[:5]:
        assert cache.get(key) == data[key]
