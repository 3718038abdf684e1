"""
``cache._cache`` as a drop-in for the library client Django's stock backend exposes there:
``pylibmc.Client`` for the pylibmc backend, pymemcache's ``HashClient`` for the other.

Each call is made twice on the same nodes: through ``cache._cache`` and through the
library's own client (a plain multi-server client for what it returns, or a plain client of
the one node that holds the key for where it lands), and Django's ``cache.get`` reads what
the call wrote, so the call went to the node the backend's own calls use.
"""

from __future__ import annotations

import pylibmc
import pytest
from django.core.cache import caches
from django.test.utils import override_settings
from memcache_status.utils import get_cache_stats
from pymemcache.client.hash import HashClient

from django_elasticache.memcached import DEFAULT_BEHAVIORS
from django_elasticache.routing import UnsupportedCall

BACKEND_PATHS = {
    "pylibmc": "django_elasticache.memcached.ElastiCache",
    "pymemcache": "django_elasticache.pymemcache.ElastiCache",
}
CAS_BEHAVIORS = {**DEFAULT_BEHAVIORS, "cas": True}


def node_names(cluster) -> list[str]:
    return [f"{node.hostname}:{node.port}" for node in cluster.nodes]


def holder(cluster, key: str) -> list[int]:
    """The indexes of the nodes holding ``key`` (the stored key)."""
    return [index for index, node in enumerate(cluster.nodes) if node.holds([key])]


def same_steps(cache, ours, plain, steps, check):
    """
    Run every step on 20 keys through ``ours`` and on keys of their own through ``plain``,
    asserting the same result each time; after the step ``check[0]``, Django's ``get``
    reads ``check[1]``, what ``ours`` wrote. Yields each (name, key) once its steps ran.
    """
    after, expected = check
    for index in range(20):
        name = f"keyed-{index}"
        key = cache.make_key(name)
        for step in steps:
            assert step(ours, key) == step(plain, f"plain:{key}")
            if step is after:
                assert cache.get(name) == expected
        yield name, key


# django-memcache-status: every node's statistics, on both backends, over TLS too


def stats_shown_by_memcache_status(backend: str, location: str, **options) -> list[dict]:
    settings = {"default": {"BACKEND": BACKEND_PATHS[backend], "LOCATION": location}}
    settings["default"]["OPTIONS"] = options
    with override_settings(CACHES=settings):
        cache = caches["default"]
        cache.clear()
        cache.set_many({f"key-{index}": index for index in range(60)})
        return get_cache_stats()


@pytest.mark.parametrize("backend", sorted(BACKEND_PATHS))
def test_memcache_status_lists_every_node(elasticache_cluster, backend) -> None:
    shown = stats_shown_by_memcache_status(backend, elasticache_cluster.location)
    expected = [
        f"{name} ({index})".encode() for index, name in enumerate(node_names(elasticache_cluster))
    ]
    assert [server["address"] for server in shown] == expected
    assert {server["name"] for server in shown} == {"default"}
    keys = [f":1:key-{index}" for index in range(60)]
    held = elasticache_cluster.keys_per_node(keys)
    items = [int(server["stats"]["curr_items"]) for server in shown]
    assert items == list(held.values()) and sum(items) == 60
    for server in shown:
        assert server["stats"]["version"] == b"1.6.18"
        assert int(server["stats"]["limit_maxbytes"]) > 0


def test_memcache_status_lists_every_node_over_tls(elasticache_cluster_factory) -> None:
    cluster = elasticache_cluster_factory(nodes=3, tls=True)
    shown = stats_shown_by_memcache_status(
        "pymemcache", cluster.location, TLS=cluster.client_tls_context()
    )
    assert [server["address"] for server in shown] == [
        f"{name} ({index})".encode() for index, name in enumerate(node_names(cluster))
    ]
    held = cluster.keys_per_node([f":1:key-{index}" for index in range(60)])
    assert [int(server["stats"]["curr_items"]) for server in shown] == list(held.values())


def test_both_backends_list_stats_as_pylibmc(elasticache_cluster, make_cache) -> None:
    """pylibmc's shape: (b"server (index)", {name: bytes}) with at least pylibmc's names."""
    plain = pylibmc.Client(elasticache_cluster.node_addresses).get_stats()
    ours = make_cache(elasticache_cluster.location)._cache.get_stats()
    assert len(ours) == len(plain) == 3
    for (address, stats), (_, plain_stats) in zip(ours, plain, strict=True):
        assert isinstance(address, bytes)
        assert set(plain_stats) - {"pid", "uptime"} <= set(stats)
        assert all(isinstance(value, bytes) for value in stats.values())


# pylibmc


@pytest.fixture
def pylibmc_pair(elasticache_cluster, make_pylibmc_cache):
    """(Django cache, its _cache, a plain pylibmc.Client over the same three nodes)."""
    cache = make_pylibmc_cache(elasticache_cluster.location, behaviors={"cas": True})
    plain = pylibmc.Client(elasticache_cluster.node_addresses, behaviors=CAS_BEHAVIORS)
    return cache, cache._cache, plain


def test_pylibmc_keyed_calls_return_what_pylibmc_returns(pylibmc_pair, elasticache_cluster):
    cache, ours, plain = pylibmc_pair
    steps = [
        lambda client, key: client.replace(key, "v"),
        lambda client, key: client.set(key, "v", time=60),
        lambda client, key: client.replace(key, "w", time=60, min_compress_len=0),
        lambda client, key: client.append(key, "+"),
        lambda client, key: client.prepend(key, "-"),
        lambda client, key: client.get(key),
        lambda client, key: client[key],
        lambda client, key: key in client,
        lambda client, key: client.gets(key)[0],
        lambda client, key: client.cas(key, "x", client.gets(key)[1]),
        lambda client, key: client.cas(key, "y", client.gets(key)[1] + 1),
        lambda client, key: client.get(key),
        lambda client, key: client.touch(key, 100),
        lambda client, key: client.add(key, "z", 0, 0, -1),
        lambda client, key: client.set(key, 5, 0, 0, -1),
        lambda client, key: client.incr(key, 2),
        lambda client, key: client.decr(key),
        lambda client, key: client.delete(key),
        lambda client, key: key in client,
    ]
    for name, key in same_steps(cache, ours, plain, steps, check=(steps[5], "-w+")):
        ours[key] = "item"
        assert cache.get(name) == "item"
        assert holder(elasticache_cluster, key) == [ours.hash(key)]
        del ours[key]
        assert cache.get(name) is None


def test_pylibmc_placement_is_a_plain_clients_over_the_node_names(pylibmc_pair) -> None:
    cache, ours, _ = pylibmc_pair
    by_name = pylibmc.Client(ours.addresses, behaviors=DEFAULT_BEHAVIORS)
    keys = [cache.make_key(f"placed-{index}") for index in range(300)]
    assert [ours.hash(key) for key in keys] == [by_name.hash(key) for key in keys]
    assert len({ours.hash(key) for key in keys}) == 3


def test_pylibmc_multi_key_calls_route_by_the_prefixed_key(pylibmc_pair, elasticache_cluster):
    cache, ours, plain = pylibmc_pair
    prefix = cache.make_key("")
    data = {f"m{index}": index for index in range(300)}
    assert ours.set_multi(data, key_prefix=prefix) == plain.set_multi(data, key_prefix="p") == []
    assert cache.get_many(list(data)) == data
    held = elasticache_cluster.keys_per_node([prefix + key for key in data])
    assert sum(held.values()) == 300 and all(held.values())
    names = [*data, "absent"]
    assert ours.get_multi(names, key_prefix=prefix) == plain.get_multi(names, "p") == data
    extra = {"m0": -1, "new": 1}
    assert ours.add_multi(extra, key_prefix=prefix) == plain.add_multi(extra, key_prefix="p")
    assert cache.get_many(["m0", "new"]) == {"m0": 0, "new": 1}
    assert ours.incr_multi(["m1", "m2"], key_prefix=prefix, delta=5) is None
    plain.incr_multi(["m1", "m2"], key_prefix="p", delta=5)
    assert cache.get_many(["m1", "m2"]) == {"m1": 6, "m2": 7} == plain.get_multi(["m1", "m2"], "p")
    with pytest.raises(pylibmc.NotFound):
        ours.incr_multi(["absent"], key_prefix=prefix)
    with pytest.raises(pylibmc.NotFound):
        plain.incr_multi(["absent"], key_prefix="p")
    assert ours.delete_multi(list(data), key_prefix=prefix) is True
    assert plain.delete_multi(list(data), key_prefix="p") is True
    assert cache.get_many(list(data)) == {}
    assert ours.delete_multi(["m1"], key_prefix=prefix) is plain.delete_multi(["m1"], "p")
    # What Django writes, _cache reads with the prefix Django adds.
    cache.set_many(data)
    assert ours.get_multi(list(data), key_prefix=prefix) == data
    assert ours.gets(prefix + "m7") == (7, ours.gets(prefix + "m7")[1])
    # Without a prefix, keys are stored as given, as Django's calls store them.
    assert ours.set_multi({prefix + "plain": 1}) == []
    assert cache.get("plain") == 1


def test_pylibmc_calls_on_every_node(pylibmc_pair, elasticache_cluster) -> None:
    cache, ours, plain = pylibmc_pair
    cache.set_many({f"k{index}": index for index in range(30)})
    assert ours.flush_all() is plain.flush_all() is True
    assert sum(elasticache_cluster.keys_per_node([f":1:k{i}" for i in range(30)]).values()) == 0
    cache.set_many({f"k{index}": index for index in range(30)})
    assert all(pool.open_count for pool in ours.pools)
    assert ours.disconnect_all() is plain.disconnect_all() is None
    assert [pool.open_count for pool in ours.pools] == [0, 0, 0]
    assert cache.get("k1") == 1


def test_pylibmc_attributes_are_a_plain_clients_over_the_node_names(
    elasticache_cluster, make_pylibmc_cache
) -> None:
    cache = make_pylibmc_cache(elasticache_cluster.location, binary=True)
    ours = cache._cache
    names = node_names(elasticache_cluster)
    plain = pylibmc.Client(names, binary=True, behaviors=DEFAULT_BEHAVIORS)
    assert ours.addresses == plain.addresses == names
    assert ours.binary is plain.binary is True
    assert ours.behaviors == plain.behaviors
    assert ours.get_behaviors()["tcp_nodelay"] == 1
    assert ours.serialize({"a": 1}) == plain.serialize({"a": 1})
    assert ours.deserialize(*plain.serialize([1, 2])) == [1, 2]
    assert ours.clone() is ours


def test_pylibmc_behaviours_cannot_be_changed_through_one_client(pylibmc_pair) -> None:
    _, ours, _ = pylibmc_pair
    with pytest.raises(UnsupportedCall, match=r"OPTIONS\['behaviors'\]"):
        ours.behaviors = {"ketama": False}
    with pytest.raises(UnsupportedCall, match=r"OPTIONS\['behaviors'\]"):
        ours.behaviors["ketama"] = False
    with pytest.raises(UnsupportedCall):
        ours.behaviors.update({"hash": "md5"})
    assert ours.behaviors["ketama"] == 1


# pymemcache


@pytest.fixture
def pymemcache_pair(elasticache_cluster, make_pymemcache_cache):
    """(Django cache, its _cache, a plain HashClient over the same three nodes)."""
    cache = make_pymemcache_cache(elasticache_cluster.location)
    servers = [(node.ip, node.port) for node in elasticache_cluster.nodes]
    kwargs = cache._cache.default_kwargs
    plain = HashClient(servers, serde=kwargs["serde"], default_noreply=False, timeout=1.0)
    yield cache, cache._cache, plain
    plain.close()


def test_pymemcache_keyed_calls_return_what_hashclient_returns(
    pymemcache_pair, elasticache_cluster
) -> None:
    cache, ours, plain = pymemcache_pair
    steps = [
        lambda client, key: client.replace(key, "v"),
        lambda client, key: client.set(key, "v", expire=60),
        lambda client, key: client.replace(key, "w", expire=60, noreply=False),
        lambda client, key: client.get(key),
        lambda client, key: client.get(key + "absent", default="d"),
        lambda client, key: client.gets(key)[0],
        lambda client, key: client.cas(key, "x", client.gets(key)[1]),
        lambda client, key: client.cas(key, "y", b"1"),
        lambda client, key: client.get(key),
        lambda client, key: client.touch(key, expire=100),
        lambda client, key: client.add(key, "z", noreply=False),
        lambda client, key: client.set(key, b"5"),
        lambda client, key: client.append(key, b"1", noreply=False),
        lambda client, key: client.prepend(key, b"2", noreply=False),
        lambda client, key: client.incr(key, 3),
        lambda client, key: client.decr(key, value=1),
        lambda client, key: client.delete(key, noreply=False),
        lambda client, key: client.get(key),
    ]
    for name, key in same_steps(cache, ours, plain, steps, check=(steps[2], "w")):
        assert ours.set(key, "again") is True
        assert cache.get(name) == "again"
        assert holder(elasticache_cluster, key) == [ours.pools.index(ours.pool_for(key))]


def test_pymemcache_multi_key_calls_under_hashclients_names(pymemcache_pair) -> None:
    cache, ours, plain = pymemcache_pair
    data = {cache.make_key(f"m{index}"): index for index in range(300)}
    assert ours.set_many(data) == plain.set_many(data) == []
    assert cache.get_many([f"m{index}" for index in range(300)]) == {
        f"m{index}": index for index in range(300)
    }
    keys = [*data, ":1:absent"]
    assert ours.get_many(keys) == plain.get_many(keys) == data
    assert {key: value for key, (value, _) in ours.gets_many(keys).items()} == data
    assert set(ours.gets_multi(keys)) == set(plain.gets_many(keys)) == set(data)
    assert ours.delete_many(list(data)[:100], noreply=False) is True
    assert plain.delete_many(list(data)[:100], noreply=False) is True
    assert len(cache.get_many([f"m{index}" for index in range(300)])) == 200


def test_pymemcache_calls_on_every_node(pymemcache_pair, elasticache_cluster) -> None:
    cache, ours, plain = pymemcache_pair
    cache.set_many({f"k{index}": index for index in range(30)})
    assert ours.flush_all() is plain.flush_all() is None
    assert sum(elasticache_cluster.keys_per_node([f":1:k{i}" for i in range(30)]).values()) == 0
    for close in ("close", "quit", "disconnect_all"):
        cache.set_many({f"k{index}": index for index in range(30)})
        assert all(pool.open_count for pool in ours.pools)
        assert getattr(ours, close)() is getattr(plain, close)() is None
        assert [pool.open_count for pool in ours.pools] == [0, 0, 0]
        assert cache.get("k1") == 1


def test_pymemcache_attributes_are_hashclients(pymemcache_pair, elasticache_cluster) -> None:
    cache, ours, _ = pymemcache_pair
    names = node_names(elasticache_cluster)
    assert list(ours.clients) == names
    assert ours.default_kwargs["no_delay"] is True
    assert ours.default_kwargs["timeout"] == 1.0
    assert ours.key_prefix == b"" and ours.encoding == "ascii" and ours.tls_context is None
    keys = [cache.make_key(f"placed-{index}") for index in range(100)]
    for key in keys:
        cache.set(key.split(":", 2)[2], "value")
        node = ours.hasher.get_node(key)
        assert holder(elasticache_cluster, key) == [names.index(node)]
        # A node's client is that node's pool: it finds the key, another node does not.
        assert ours.clients[node].get(key) == "value"
        assert ours.clients[names[names.index(node) - 1]].get(key) is None


def test_pymemcache_node_list_cannot_be_changed_by_hand(pymemcache_pair) -> None:
    _, ours, _ = pymemcache_pair
    with pytest.raises(UnsupportedCall, match="configuration endpoint"):
        ours.add_server("127.0.0.1", 11211)
    with pytest.raises(UnsupportedCall, match="configuration endpoint"):
        ours.remove_server(("127.0.0.1", 11211))


def test_pymemcache_node_client_calls_borrow_from_the_pool(pymemcache_pair) -> None:
    cache, ours, _ = pymemcache_pair
    cache.set("key", "value")
    name, node_client = next(iter(ours.clients.items()))
    pool = ours.pools[0]
    assert node_client.version() == b"1.6.18"
    opened = pool.open_count
    assert node_client.stats()[b"curr_connections"] >= 1
    assert pool.open_count == opened  # borrowed and given back, not a new connection
    assert node_client.server == (name.rsplit(":", 1)[0], pool.node.port)
    with pytest.raises(AttributeError):
        node_client.__deepcopy__  # noqa: B018
