"""LocalCluster(latency=...) makes every round trip with its nodes and its configuration
endpoint take that much longer, as a network would, without reordering or losing a byte."""

from __future__ import annotations

import math
import re
import socket
import time

import pylibmc
import pytest
from support import read_until_closed, timeout_rules

from django_elasticache import memcached
from django_elasticache.cluster_utils import EndpointTimeout, discover
from django_elasticache.options import parse_location
from django_elasticache.testing import LocalCluster, MemcachedNode

TIMEOUT = 5.0
# Long enough to tell from loopback's tens of microseconds on a loaded machine.
LATENCY = 0.05
PIPELINED_GETS = 2000


def round_trip(node: MemcachedNode) -> float:
    """Seconds from sending a meta no-op to a node to its whole reply."""
    with socket.create_connection((node.ip, node.port), timeout=TIMEOUT) as conn:
        started = time.perf_counter()
        conn.sendall(b"mn\r\n")
        reply = b""
        while not reply.endswith(b"MN\r\n"):
            chunk = conn.recv(4096)
            assert chunk, f"the node closed the connection after {reply!r}"
            reply += chunk
        return time.perf_counter() - started


def test_a_round_trip_to_a_node_takes_at_least_the_latency(elasticache_cluster_factory) -> None:
    cluster = elasticache_cluster_factory(nodes=2, latency=LATENCY)

    assert cluster.latency == LATENCY
    for node in cluster.nodes:
        assert round_trip(node) >= LATENCY


def test_discovery_at_the_endpoint_takes_at_least_the_latency(
    elasticache_cluster_factory,
) -> None:
    cluster = elasticache_cluster_factory(nodes=2, latency=LATENCY)
    endpoint = parse_location(cluster.location)

    started = time.perf_counter()
    config = discover(endpoint.host, endpoint.port, TIMEOUT)

    assert time.perf_counter() - started >= LATENCY
    assert config.version == cluster.config_version
    assert [node.port for node in config.nodes] == [node.port for node in cluster.nodes]
    assert cluster.endpoint.discovery_requests == 1  # the emulated endpoint answered


def test_pipelined_writes_and_reads_come_back_intact(elasticache_cluster_factory, make_cache):
    """Many requests sent before any reply, values larger than the relay's reads."""
    # 7.7 MB of values in 100 slab sizes: 16 MB a node (the default) evicts some when
    # placement puts most of the large ones on one node; 32 MB holds them all on one.
    cluster = elasticache_cluster_factory(nodes=3, latency=0.002, memory_mb=32)
    cache = make_cache(cluster.location)
    values = {f"key:{i}": f"{i}:".encode() * (1 + i * 997 % 60_000) for i in range(100)}

    assert cache.set_many(values) == []
    wanted = [*values, *(f"missing:{i}" for i in range(200))]
    assert cache.get_many(wanted) == values
    cache.delete_many(list(values)[:50])
    assert cache.get_many(wanted) == dict(list(values.items())[50:])


def test_pipelined_replies_keep_their_order(elasticache_cluster_factory) -> None:
    """Thousands of gets on one connection in one send: each reply in its request's place."""
    cluster = elasticache_cluster_factory(nodes=1, latency=0.002)
    node = cluster.nodes[0]
    request = b"ms shared 5\r\nvalue\r\n"
    request += b"".join(b"mg shared v O%d\r\n" % i for i in range(PIPELINED_GETS))

    with socket.create_connection((node.ip, node.port), timeout=TIMEOUT) as conn:
        conn.sendall(request + b"quit\r\n")
        reply = read_until_closed(conn)

    expected = b"HD\r\n" + b"".join(b"VA 5 O%d\r\nvalue\r\n" % i for i in range(PIPELINED_GETS))
    assert reply == expected


def test_a_timeout_shorter_than_the_latency_fires(elasticache_cluster_factory, make_cache):
    cluster = elasticache_cluster_factory(nodes=1, latency=1.0)
    options, timeout_error = timeout_rules(type(make_cache(cluster.location)))
    cache = make_cache(cluster.location, DISCOVERY_TIMEOUT=0.3, **options)

    with pytest.raises(EndpointTimeout, match=cluster.location):
        cache.get("key")  # discovery, the first round trip, gives up
    patient = make_cache(cluster.location, DISCOVERY_TIMEOUT=5, **options)
    if isinstance(patient, memcached.ElastiCache) and pylibmc.libmemcached_version.startswith(
        "1.0."
    ):
        # libmemcached 1.0 (pylibmc's wheels) answers a get whose reply came too late with a
        # miss, as it answers one from a dead node; its set raises.
        with pytest.raises(timeout_error):
            patient.set("key", "value")
        return
    with pytest.raises(timeout_error):
        patient.get("key")  # discovered; the node's reply comes too late


def test_latency_over_tls(elasticache_cluster_factory, make_pymemcache_cache) -> None:
    """TLS to the nodes ends at the relay; to the endpoint it passes through it."""
    cluster = elasticache_cluster_factory(nodes=2, tls=True, latency=0.002)
    cache = make_pymemcache_cache(cluster.location, TLS=cluster.client_tls_context())

    cache.set_many({"a": 1, "b": 2})

    assert cache.get_many(["a", "b", "c"]) == {"a": 1, "b": 2}


@pytest.mark.parametrize(
    ("latency", "error", "message"),
    [
        (-0.001, ValueError, "latency must be a finite number of seconds >= 0, got -0.001"),
        (math.inf, ValueError, "got inf"),
        (math.nan, ValueError, "got nan"),
        ("0.3", TypeError, "latency must be a number of seconds, got '0.3'"),
        (True, TypeError, "got True"),
        (None, TypeError, "got None"),
    ],
)
def test_a_bad_latency_is_refused_before_anything_starts(latency, error, message) -> None:
    with pytest.raises(error, match=re.escape(message)):
        LocalCluster(latency=latency)


def test_latency_needs_the_relay() -> None:
    with pytest.raises(ValueError, match=re.escape("latency=0.001 is added by the relay")):
        LocalCluster(relay=False, latency=0.001)


def test_no_latency_leaves_the_endpoint_where_it_is(elasticache_cluster) -> None:
    assert elasticache_cluster.latency == 0
    assert elasticache_cluster.location == elasticache_cluster.endpoint.location
