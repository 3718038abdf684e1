"""
Where keys live: placement follows node hostnames, as libmemcached (pylibmc backend) and
pymemcache's rendezvous hashing (pymemcache backend) place them over the names, so that a
replaced node (same hostname and port, new IP) moves no key, and a failed node's keys are
never written elsewhere.
"""

from __future__ import annotations

import contextlib

import pylibmc
import pymemcache
from support import eventually

from django_elasticache.memcached import DEFAULT_BEHAVIORS
from django_elasticache.testing import LocalCluster, start_memcached

KEYS = [f"key-{index}" for index in range(3000)]


def django_keys(keys: list[str]) -> list[str]:
    """The memcached keys Django makes with no KEY_PREFIX and version 1."""
    return [f":1:{key}" for key in keys]


def uses(cache, address: str) -> bool:
    """Whether the backend routes to this node now. A request lets it notice a new list;
    until then a removed node errs."""
    with contextlib.suppress(*cache.server_errors):
        cache.get("probe")
    return address in cache.client_servers


def test_pylibmc_backend_places_keys_where_libmemcached_does(
    elasticache_cluster_factory, make_pylibmc_cache
) -> None:
    """
    Nodes advertised as ``localhost`` give names libmemcached itself can connect to: keys a
    plain pylibmc client with ketama stores over those names are all found by the backend,
    which computes placement apart from the connections it uses.
    """
    cluster = elasticache_cluster_factory(advertise_ip=False)
    names = [f"localhost:{node.port}" for node in cluster.nodes]
    plain = pylibmc.Client(names, behaviors=DEFAULT_BEHAVIORS)
    keys = [f"placed-{index}" for index in range(10_000)]
    assert plain.set_multi({key: key for key in django_keys(keys)}) == []
    per_node = cluster.keys_per_node(django_keys(keys))
    assert all(count > 2000 for count in per_node.values()), per_node

    cache = make_pylibmc_cache(cluster.location)
    found = {}
    for start in range(0, len(keys), 500):
        found.update(cache.get_many(keys[start : start + 500]))
    assert len(found) == len(keys)
    assert all(found[key] == f":1:{key}" for key in keys)


def owners(cluster: LocalCluster, keys: list[str]) -> dict[str, str]:
    """The hostname of the node that holds each key, asked of every node directly."""
    found = {}
    for node in cluster.nodes:
        with contextlib.closing(pymemcache.Client((node.ip, node.port), timeout=5)) as direct:
            for memcached_key in direct.get_many(django_keys(keys)):
                found[memcached_key.removeprefix(":1:")] = node.hostname
    return found


def test_replacing_a_node_moves_no_key_of_the_others(elasticache_cluster, make_cache) -> None:
    """
    ElastiCache replaces a node under the same hostname and port with a new IP. Keys of the
    nodes that stay must stay where they are: before placement followed hostnames, 18.5% of
    them moved, and after two replacements old values came back.
    """
    cluster = elasticache_cluster
    cache = make_cache(cluster.location, REFRESH_INTERVAL=0.2)
    cache.set_many({key: "before" for key in KEYS})
    victim = cluster.nodes[1]
    kept = {key for key, host in owners(cluster, KEYS).items() if host != victim.hostname}
    assert 1500 < len(kept) < 2500

    with start_memcached("127.0.0.2", victim.port, hostname=victim.hostname) as replacement:
        nodes = [replacement if node is victim else node for node in cluster.nodes]
        cluster.publish(nodes, cluster.config_version + 1)
        eventually(
            lambda: uses(cache, replacement.address),
            "the backend uses the replacement",
        )
        found = cache.get_many(sorted(kept))
        assert len(found) == len(kept)  # not one key of a surviving node moved
        cache.set_many({key: "after" for key in KEYS})
        assert set(cache.get_many(KEYS).values()) == {"after"}
        assert sum(replacement.holds(django_keys([key])) for key in KEYS) == len(KEYS) - len(kept)


def test_a_failed_nodes_keys_are_never_written_elsewhere(elasticache_cluster, make_cache) -> None:
    cluster = elasticache_cluster
    cache = make_cache(cluster.location, IGNORE_EXCEPTIONS=True, REFRESH_INTERVAL=None)
    cache.set_many({key: "old" for key in KEYS})
    victim = cluster.nodes[0]
    theirs = [key for key, host in owners(cluster, KEYS).items() if host == victim.hostname]
    cluster.kill_node(victim)
    for key in theirs[:200]:
        assert cache.set(key, "new") is False
    assert cache.set_many({key: "new" for key in theirs[200:400]}) != []
    others = [node for node in cluster.nodes if node is not victim]
    assert sum(node.holds(django_keys(theirs)) for node in others) == 0


def test_keys_deleted_while_scaled_out_stay_deleted_after_scale_in(
    elasticache_cluster, make_cache
) -> None:
    """
    A scale-out moves some keys to the new node while their old copies stay on their former
    owner; deleting them then, and scaling back in, used to bring 78 of 300 back.
    """
    cluster = elasticache_cluster
    cache = make_cache(cluster.location, REFRESH_INTERVAL=0.2)
    keys = [f"deleted-{index}" for index in range(300)]
    cache.set_many({key: "old" for key in keys})

    def delete_all() -> None:
        cache.delete_many(keys[:150])
        for key in keys[150:]:
            cache.delete(key)

    while_scaled_out(cluster, cache, delete_all)
    assert cache.get_many(keys) == {}


def test_keys_written_while_scaled_out_read_back_new_after_scale_in(
    elasticache_cluster, make_cache
) -> None:
    cluster = elasticache_cluster
    cache = make_cache(cluster.location, REFRESH_INTERVAL=0.2)
    keys = [f"rewritten-{index}" for index in range(300)]
    cache.set_many({key: "old" for key in keys})
    while_scaled_out(cluster, cache, lambda: cache.set_many({key: "new" for key in keys}))
    assert set(cache.get_many(keys).values()) <= {"new"}


def while_scaled_out(cluster, cache, act) -> None:
    """Add a node, act once the backend uses it, then remove it and wait until the backend
    no longer does."""
    added = cluster.add_node()
    eventually(lambda: uses(cache, added.address), "the backend uses the added node")
    act()
    cluster.remove_node(added)
    eventually(
        lambda: not uses(cache, added.address), "the backend no longer uses the removed node"
    )
