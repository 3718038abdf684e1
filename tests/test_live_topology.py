"""Following the cluster while it changes, and surviving its failures, on LocalCluster."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import pylibmc
import pytest
from support import DEADLINE, ForkedChild, eventually

from django_elasticache import forks, topology
from django_elasticache.cluster_utils import EndpointTimeout, EndpointUnreachable
from django_elasticache.memcached import ElastiCache
from django_elasticache.options import BackendOptions, Endpoint
from django_elasticache.testing import ConfigEndpoint
from django_elasticache.testing.tls import CertificateAuthority
from django_elasticache.topology import DiscoveryPending, topology_for

REFRESH = 0.2
# A bound on any single cache call while the endpoint misbehaves: far above a loopback
# round trip, far below the discovery timeout a blocked request would wait for.
CALL_BOUND = 0.5


@pytest.fixture
def fast_error_refresh(monkeypatch):
    monkeypatch.setattr(topology, "ERROR_REFRESH_SPACING", 0.0)


def attempts(endpoint) -> int:
    """Discoveries begun: each starts with ``version``, which even a hanging endpoint reads."""
    return endpoint.requests.count("version")


def refreshed_twice(cache, endpoint, before: int) -> bool:
    cache.get("probe")  # refreshes start from requests, never on their own
    return attempts(endpoint) >= before + 2


def serves(cache, addresses) -> bool:
    # A request is what lets the backend notice a new list; until then a removed node errs.
    with contextlib.suppress(*cache.server_errors):
        cache.get("probe")
    return sorted(cache.client_servers) == sorted(addresses)


def test_scale_out_and_in_while_serving(elasticache_cluster, make_cache) -> None:
    cache = make_cache(elasticache_cluster.location, REFRESH_INTERVAL=REFRESH)
    keys = [f"k{index}" for index in range(200)]
    cache.set_many({key: key for key in keys})

    added = [elasticache_cluster.add_node(), elasticache_cluster.add_node()]
    eventually(lambda: serves(cache, elasticache_cluster.node_addresses), "scale-out seen")
    cache.set_many({key: key for key in keys})
    held = elasticache_cluster.keys_per_node([cache.make_key(key) for key in keys])
    assert all(held[node.address] > 0 for node in added), held

    for node in added:
        elasticache_cluster.remove_node(node)
    eventually(lambda: serves(cache, elasticache_cluster.node_addresses), "scale-in seen")
    cache.set_many({key: key for key in keys})
    assert cache.get_many(keys) == {key: key for key in keys}


def test_scale_out_moves_about_one_key_in_five(elasticache_cluster_factory, make_cache) -> None:
    cluster = elasticache_cluster_factory(nodes=4)
    cache = make_cache(cluster.location, REFRESH_INTERVAL=REFRESH)
    keys = [f"k{index}" for index in range(1000)]
    before = owners(cluster, cache, keys)
    cluster.add_node()
    eventually(lambda: serves(cache, cluster.node_addresses), "fifth node seen")
    cache.clear()
    after = owners(cluster, cache, keys)
    moved = sum(after[key] != before[key] for key in keys) / len(keys)
    assert 0.12 < moved < 0.28, moved


def owners(cluster, cache, keys: list[str]) -> dict[str, str]:
    """The node that stores each key after the backend sets it."""
    cache.set_many(dict.fromkeys(keys, 1))
    stored = {key: cache.make_key(key) for key in keys}
    return {
        key: next(node.address for node in cluster.nodes if node.holds([stored[key]]))
        for key in keys
    }


def test_replaced_node_keeps_its_hostname_and_gets_traffic(elasticache_cluster, make_cache):
    cache = make_cache(elasticache_cluster.location, REFRESH_INTERVAL=REFRESH)
    cache.get("warm")
    old = elasticache_cluster.nodes[0]
    new = elasticache_cluster.replace_node(old)
    assert new.hostname == old.hostname and new.address != old.address
    eventually(lambda: serves(cache, elasticache_cluster.node_addresses), "replacement seen")
    keys = [f"r{index}" for index in range(200)]
    cache.set_many({key: key for key in keys})
    assert elasticache_cluster.keys_per_node([cache.make_key(k) for k in keys])[new.address]


def test_stale_lower_version_is_ignored(elasticache_cluster, make_cache, caplog) -> None:
    cache = make_cache(elasticache_cluster.location, REFRESH_INTERVAL=REFRESH)
    cache.get("warm")
    good = list(cache.client_servers)
    endpoint = elasticache_cluster.endpoint
    with caplog.at_level(logging.WARNING, logger="django_elasticache"):
        elasticache_cluster.publish(elasticache_cluster.nodes[:1], version=0)
        before = attempts(endpoint)
        eventually(lambda: refreshed_twice(cache, endpoint, before), "two refreshes")
    cache.get("again")
    assert cache.client_servers == good
    assert "Ignoring stale node list" in caplog.text


@pytest.mark.parametrize("mode", ["hang", "error", "garbage", "close", "truncated"])
def test_misbehaving_endpoint_during_refresh_keeps_the_last_list(
    elasticache_cluster, make_cache, mode
) -> None:
    cache = make_cache(
        elasticache_cluster.location, REFRESH_INTERVAL=REFRESH, DISCOVERY_TIMEOUT=0.5
    )
    cache.set("key", "value")
    good = list(cache.client_servers)
    endpoint = elasticache_cluster.endpoint
    endpoint.misbehave(mode)
    before = attempts(endpoint)
    worst = 0.0
    deadline = time.monotonic() + DEADLINE
    while attempts(endpoint) < before + 2 and time.monotonic() < deadline:
        started = time.monotonic()
        assert cache.get("key") == "value"
        worst = max(worst, time.monotonic() - started)
    assert attempts(endpoint) >= before + 2
    assert worst < CALL_BOUND, worst
    assert cache.client_servers == good


def test_endpoint_gone_during_refresh_keeps_the_last_list(
    elasticache_cluster, make_cache, caplog
) -> None:
    cache = make_cache(elasticache_cluster.location, REFRESH_INTERVAL=REFRESH)
    cache.set("key", "value")
    good = list(cache.client_servers)
    elasticache_cluster.endpoint.stop()

    def refreshed_twice() -> bool:
        assert cache.get("key") == "value"
        # Refused by the endpoint, each refresh asks the nodes, which answer or not.
        outcomes = ("keeping config version", "the known nodes answered instead")
        return (
            sum(
                outcome in record.getMessage() for record in caplog.records for outcome in outcomes
            )
            >= 2
        )

    with caplog.at_level(logging.INFO, logger="django_elasticache"):
        eventually(refreshed_twice, "two refreshes with the endpoint gone")
    assert cache.client_servers == good


def test_no_refresh_when_interval_is_zero(elasticache_cluster, make_cache) -> None:
    cache = make_cache(elasticache_cluster.location, REFRESH_INTERVAL=0)
    cache.get("warm")
    elasticache_cluster.add_node()
    for _ in range(50):  # an interval of 0 taken literally would refresh on each request
        cache.get("probe")
    assert elasticache_cluster.endpoint.discovery_requests == 1
    assert len(cache.client_servers) == 3


def test_no_error_triggered_refresh_when_interval_is_zero(
    elasticache_cluster, make_cache, fast_error_refresh
) -> None:
    cache = make_cache(elasticache_cluster.location, REFRESH_INTERVAL=0)
    assert errors_after_a_node_dies(elasticache_cluster, cache, keys=50) > 0
    assert elasticache_cluster.endpoint.discovery_requests == 1


def test_killed_node_surfaces_errors_without_ignore_exceptions(elasticache_cluster, make_cache):
    cache = make_cache(elasticache_cluster.location, REFRESH_INTERVAL=60)
    assert errors_after_a_node_dies(elasticache_cluster, cache, keys=100) > 0


def errors_after_a_node_dies(cluster, cache, keys: int) -> int:
    """Store keys, kill the first node, and count the reads of them that raise."""
    names = [f"k{index}" for index in range(keys)]
    cache.set_many({name: name for name in names})
    cluster.kill_node(cluster.nodes[0])
    errors = 0
    for name in names:
        try:
            cache.get(name)
        except cache.server_errors:
            errors += 1
    return errors


def test_killed_node_reads_as_misses_with_ignore_exceptions(
    elasticache_cluster, make_cache, caplog
) -> None:
    cache = make_cache(elasticache_cluster.location, IGNORE_EXCEPTIONS=True)
    keys = [f"k{index}" for index in range(100)]
    cache.set_many({key: key for key in keys})
    victim = elasticache_cluster.nodes[0]
    on_victim = victim.holds([cache.make_key(key) for key in keys])
    elasticache_cluster.kill_node(victim)
    with caplog.at_level(logging.WARNING, logger="django_elasticache"):
        started = time.monotonic()
        hits = sum(cache.get(key) is not None for key in keys)
        elapsed = time.monotonic() - started
        assert cache.set("new", 1) in (None, False)
        assert isinstance(cache.get_many(keys), dict)
        assert isinstance(cache.set_many({key: 1 for key in keys}), list)
        assert cache.delete(keys[0]) in (True, False)
    assert hits == len(keys) - on_victim
    assert elapsed < 5, elapsed
    warnings = [r for r in caplog.records if "IGNORE_EXCEPTIONS" in r.getMessage()]
    assert 1 <= len(warnings) <= 2, [r.getMessage() for r in warnings]
    # libmemcached 1.1 names the failing node in its errors; 1.0 (pylibmc's wheels) does
    # not, so the warning can only name the cluster's endpoint there.
    names_node = isinstance(cache, ElastiCache) and not pylibmc.libmemcached_version.startswith(
        "1.0."
    )
    source = victim.address if names_node else elasticache_cluster.location
    assert f"errors from {source} since" in warnings[0].getMessage()

    elasticache_cluster.restart_node(victim)
    data = {key: key for key in keys}
    eventually(lambda: cache.set_many(data) == [], "every node takes writes again")
    assert cache.get_many(keys) == data


def test_ignore_exceptions_keeps_caller_errors_and_incr_semantics(
    elasticache_cluster, make_cache
) -> None:
    cache = make_cache(elasticache_cluster.location, IGNORE_EXCEPTIONS=True)
    with pytest.raises(ValueError, match="not found"):
        cache.incr("missing")
    from django.core.cache import InvalidCacheKey

    with pytest.raises(InvalidCacheKey):
        cache.get("bad key")
    for node in elasticache_cluster.nodes:
        elasticache_cluster.kill_node(node)
    assert cache.get("x", "fallback") == "fallback"
    assert cache.add("x", 1) is False
    assert cache.touch("x") is False
    assert cache.has_key("x") is False
    assert cache.get_or_set("x", 5) == 5
    with pytest.raises(ValueError, match="not found"):
        cache.incr("x")
    assert cache.set_many({"a": 1, "b": 2}) == ["a", "b"]
    assert cache.delete_many(["a"]) is None
    assert cache.clear() is None


def test_unreachable_endpoint_at_start_is_a_miss_with_ignore_exceptions(make_cache) -> None:
    cache = make_cache("127.0.0.1:9", IGNORE_EXCEPTIONS=True, DISCOVERY_TIMEOUT=0.5)
    assert cache.get("key", "default") == "default"
    strict = make_cache("127.0.0.1:9", DISCOVERY_TIMEOUT=0.4)
    with pytest.raises(EndpointUnreachable):
        strict.get("key")


def test_node_error_brings_refresh_forward(
    elasticache_cluster, make_cache, fast_error_refresh
) -> None:
    cache = make_cache(elasticache_cluster.location, REFRESH_INTERVAL=3600)
    keys = [f"k{index}" for index in range(100)]
    cache.set_many({key: key for key in keys})
    victim = elasticache_cluster.nodes[0]
    replacement = elasticache_cluster.replace_node(victim)
    requests = elasticache_cluster.endpoint.discovery_requests

    def healed() -> bool:
        for key in keys:  # get_many skips a dead node silently; single gets raise
            try:
                cache.get(key)
            except cache.server_errors:
                return False
        return replacement.address in cache.client_servers

    eventually(healed, "error-triggered refresh picked up the replacement")
    assert elasticache_cluster.endpoint.discovery_requests > requests


def test_many_threads_at_refresh_time_make_one_request(elasticache_cluster, make_cache):
    caches = [make_cache(elasticache_cluster.location, REFRESH_INTERVAL=0.5) for _ in range(8)]
    caches[0].get("warm")
    elasticache_cluster.endpoint.misbehave("hang")
    time.sleep(0.6)  # past the interval: every request below finds a refresh due
    barrier = threading.Barrier(len(caches), timeout=10)
    worst: list[float] = []

    def request(cache) -> None:
        barrier.wait()
        for _ in range(20):
            started = time.monotonic()
            cache.get("key")
            worst.append(time.monotonic() - started)

    threads = [threading.Thread(target=request, args=(cache,)) for cache in caches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert len(worst) == 160 and max(worst) < CALL_BOUND
    assert attempts(elasticache_cluster.endpoint) == 2
    elasticache_cluster.endpoint.behave()


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize("handler_runs", [1, 2], ids=["os.fork", "uwsgi-both-hooks"])
def test_forked_child_starts_clean(elasticache_cluster, make_cache, handler_runs) -> None:
    """
    Also where the package's fork handlers run twice: uWSGI told to call Python's fork hooks
    (``py-call-osafterfork``) runs them, then its post-fork hook (``forks``) runs them again.
    """
    cache = make_cache(elasticache_cluster.location, REFRESH_INTERVAL=60)
    cache.set("parent", "value")
    parent_client = cache._cache

    def in_child() -> str:
        for _ in range(handler_runs - 1):
            forks._run_handlers()
        fresh = cache._cache is not parent_client
        works = cache.get("parent") == "value" and cache.set("child", 1) is None
        no_discovery = elasticache_cluster.endpoint.discovery_requests == 1
        return f"{fresh} {works} {no_discovery}"

    assert ForkedChild(in_child).report() == "True True True"
    assert cache._cache is parent_client
    assert cache.get("child") == 1 and cache.get("parent") == "value"


def test_clear_with_a_dead_node_flushes_the_others_and_raises(
    elasticache_cluster, make_cache
) -> None:
    cache = make_cache(elasticache_cluster.location)
    keys = [f"k{index}" for index in range(100)]
    cache.set_many({key: key for key in keys})
    dead, *alive = elasticache_cluster.nodes
    elasticache_cluster.kill_node(dead)
    for _ in range(3):
        with pytest.raises(cache.server_errors):
            cache.clear()
    assert [node.holds([cache.make_key(key) for key in keys]) for node in alive] == [0, 0]


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_workers_forked_from_an_idle_parent_follow_a_scale_out(
    elasticache_cluster, make_cache
) -> None:
    """
    A pre-fork server's master used the cache once, then served nothing while the cluster
    grew; workers forked more than an interval later refresh at their first request.
    """
    interval = 0.5
    cache = make_cache(elasticache_cluster.location, REFRESH_INTERVAL=interval)
    cache.set("parent", "value")
    confirmed = time.monotonic()
    elasticache_cluster.add_node()
    grown = sorted(elasticache_cluster.node_addresses)
    while time.monotonic() < confirmed + interval * 1.2:  # the master idles
        time.sleep(0.05)
    requests_before = elasticache_cluster.endpoint.discovery_requests
    children = [ForkedChild(lambda: child_follows(cache, grown)) for _ in range(3)]
    assert [child.report() for child in children] == ["followed"] * 3
    assert elasticache_cluster.endpoint.discovery_requests >= requests_before + 3


def child_follows(cache, grown: list[str]) -> str:
    assert cache.get("parent") == "value"  # the first request: starts the refresh
    eventually(lambda: serves(cache, grown), "the child serves the grown list")
    return "followed"


def test_recreated_cluster_is_followed_back_to_a_lower_version(
    elasticache_cluster_factory, make_cache, monkeypatch
) -> None:
    monkeypatch.setattr(topology, "STALE_SECONDS_TO_ACCEPT", 3 * REFRESH)
    cluster = elasticache_cluster_factory(nodes=3, config_version=40)
    cache = make_cache(cluster.location, REFRESH_INTERVAL=REFRESH)
    cache.set("warm", 1)
    recreated = cluster.nodes[1:]
    cluster.publish(recreated, version=1)
    eventually(lambda: serves(cache, [node.address for node in recreated]), "version 1 taken")
    cluster.add_node()
    eventually(lambda: serves(cache, cluster.node_addresses), "version 2 taken")


def test_hung_endpoint_at_start_up_blocks_only_the_first_request(
    elasticache_cluster, make_cache, monkeypatch
) -> None:
    monkeypatch.setattr(topology, "FIRST_DISCOVERY_RETRY", 0.2)
    endpoint = elasticache_cluster.endpoint
    endpoint.misbehave("hang")
    first = make_cache(elasticache_cluster.location, DISCOVERY_TIMEOUT=0.5)
    outcome: list[BaseException] = []

    def first_request() -> None:
        try:
            first.get("key")
        except EndpointTimeout as exc:
            outcome.append(exc)

    thread = threading.Thread(target=first_request)
    thread.start()
    eventually(lambda: attempts(endpoint) == 1, "first discovery under way")
    strict = make_cache(elasticache_cluster.location, DISCOVERY_TIMEOUT=0.5)
    lenient = make_cache(
        elasticache_cluster.location, DISCOVERY_TIMEOUT=0.5, IGNORE_EXCEPTIONS=True
    )
    with pytest.raises(DiscoveryPending, match="still under way"):
        strict.get("key")
    assert lenient.get("key", "miss") == "miss"
    thread.join(DEADLINE)
    assert len(outcome) == 1
    endpoint.behave()

    def recovered() -> bool:
        with contextlib.suppress(EndpointTimeout, DiscoveryPending):
            return strict.set("key", "value") is None and lenient.get("key") == "value"
        return False

    eventually(recovered, "discovery retried once the endpoint answers")


@pytest.mark.parametrize("outage", ["stopped", "hang"])
@pytest.mark.parametrize("tls", [False, True], ids=["clear-text", "tls"])
def test_scale_out_during_an_endpoint_outage_is_learnt_from_the_nodes(
    tls: bool, outage: str
) -> None:
    """Every ElastiCache node answers discovery: emulated here by ConfigEndpoint servers."""
    with contextlib.ExitStack() as stack:
        authority = stack.enter_context(CertificateAuthority()) if tls else None

        def server(name: str) -> ConfigEndpoint:
            context = None if authority is None else authority.server_context([name])
            return stack.enter_context(ConfigEndpoint(tls=context))

        endpoint = server("127.0.0.1")
        names = ["n1.cache.local", "n2.cache.local", "n3.cache.local"]
        nodes = [server(name) for name in names]
        listed = [(name, node.host, node.port) for name, node in zip(names, nodes, strict=True)]

        def publish(count: int, version: int) -> None:
            for each in (endpoint, *nodes):
                each.publish(listed[:count], version)

        publish(2, 1)
        options = BackendOptions(
            refresh_interval=REFRESH,
            discovery_timeout=0.5,
            tls=None if authority is None else authority.client_context(),
        )
        cluster = topology_for(Endpoint(endpoint.host, endpoint.port), options.discovery_settings)
        assert [node.hostname for node in cluster.current().nodes] == names[:2]
        if outage == "stopped":
            endpoint.stop()
        else:
            endpoint.misbehave("hang")
        publish(3, 2)
        eventually(lambda: len(cluster.current().nodes) == 3, "scale-out learnt from nodes")
        assert cluster.current().version == 2
        assert sum(node.discovery_requests for node in nodes[:2]) >= 1


def test_scale_out_during_an_endpoint_outage_is_followed_through_the_nodes(
    elasticache_cluster, make_cache
) -> None:
    """Every ElastiCache node answers ``config get cluster``: with the configuration
    endpoint down, the backend asks the nodes it knows and still follows a scale-out."""
    cache = make_cache(elasticache_cluster.location, REFRESH_INTERVAL=REFRESH)
    cache.set("key", "value")
    elasticache_cluster.endpoint.stop()
    added = elasticache_cluster.add_node()
    eventually(
        lambda: serves(cache, elasticache_cluster.node_addresses),
        f"the backend uses {added.address} while the endpoint is down",
    )
    cache.set_many({f"k{index}": index for index in range(200)})
    assert added.holds([cache.make_key(f"k{index}") for index in range(200)]) > 0
