"""Cluster health in code, the topology's signals and the django-health-check plugin."""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import threading
import time
from typing import Any

import pytest
from django.core.cache.backends.base import InvalidCacheBackendError
from django.test import override_settings

from django_elasticache import health, signals
from django_elasticache.cluster_utils import ClusterConfig, EndpointUnreachable
from django_elasticache.memcached import ElastiCache

POLL_DEADLINE = 30.0


def caches_for(location: str, **options: Any) -> dict:
    backend = "django_elasticache.memcached.ElastiCache"
    return {"default": {"BACKEND": backend, "LOCATION": location, "OPTIONS": options}}


def test_check_gives_every_node_and_what_this_process_uses(elasticache_cluster_factory) -> None:
    cluster = elasticache_cluster_factory(nodes=3)
    with override_settings(CACHES=caches_for(cluster.location)):
        cache = ElastiCache(cluster.location, {})
        cache.set("key", "value")
        assert cache.get("key") == "value" and cache.get("missing") is None
        report = health.check("default")
    assert report.status is health.Status.HEALTHY and report.config_version == 1
    assert [node.address for node in report.nodes] == cluster.node_addresses
    assert all(node.up and node.engine_version == "1.6.18" for node in report.nodes)
    assert sum(node.stats.items for node in report.nodes) == 1
    hits = sum(node.stats.get_hits for node in report.nodes)
    misses = sum(node.stats.get_misses for node in report.nodes)
    assert (hits, misses) == (1, 1)
    assert report.process.config_version == 1
    assert report.process.nodes == tuple(cluster.node_addresses)
    assert report.process.last_answer is not None and report.process.last_error is None


def test_check_of_an_unknown_or_foreign_alias_raises() -> None:
    local = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    with (
        override_settings(CACHES=local),
        pytest.raises(InvalidCacheBackendError, match="'default'"),
    ):
        health.check("default")


def test_ignore_cluster_errors_checks_the_endpoint_as_the_only_node(
    elasticache_cluster_factory,
) -> None:
    from django_elasticache.testing import start_memcached

    with start_memcached() as plain:
        settings = caches_for(plain.address, IGNORE_CLUSTER_ERRORS=True)
        with override_settings(CACHES=settings):
            report = health.check()
    assert report.status is health.Status.HEALTHY
    assert [node.address for node in report.nodes] == [plain.address]
    assert "does not support cluster discovery" in report.discovery_error


class Received:
    """Collects what a signal delivers, from whatever thread sends it."""

    def __init__(self, signal: Any) -> None:
        self.calls: list[dict[str, Any]] = []
        self.arrived = threading.Event()
        signal.connect(self.receive, weak=False)
        self.signal = signal

    def receive(self, **named: Any) -> None:
        self.calls.append(named)
        self.arrived.set()

    def wait(self) -> dict[str, Any]:
        assert self.arrived.wait(POLL_DEADLINE), "signal not received"
        return self.calls[0]

    def close(self) -> None:
        self.signal.disconnect(self.receive)


@pytest.fixture
def received(request: pytest.FixtureRequest):
    receivers: list[Received] = []

    def make(signal: Any) -> Received:
        receivers.append(Received(signal))
        return receivers[-1]

    yield make
    for receiver in receivers:
        receiver.close()


def poll_cache_until(cache: Any, received: Received) -> dict[str, Any]:
    """Use the cache (which starts due refreshes) until the signal arrives."""
    deadline = time.monotonic() + POLL_DEADLINE
    while not received.arrived.is_set() and time.monotonic() < deadline:
        cache.get("any")
        received.arrived.wait(0.05)
    return received.wait()


def test_node_list_changed_is_sent_on_a_real_change(elasticache_cluster_factory, received) -> None:
    cluster = elasticache_cluster_factory(nodes=2)
    changed = received(signals.node_list_changed)
    cache = ElastiCache(cluster.location, {"OPTIONS": {"REFRESH_INTERVAL": 0.2}})
    cache.get("any")
    cluster.add_node()
    call = poll_cache_until(cache, changed)
    assert call["sender"].__name__ == "ClusterTopology"
    assert call["endpoint"] == cluster.location
    old, new = call["old"], call["new"]
    assert isinstance(old, ClusterConfig) and isinstance(new, ClusterConfig)
    assert (old.version, len(old.nodes), new.version) == (1, 2, 2)
    assert list(new.addresses) == cluster.node_addresses


def test_refresh_failed_is_sent_and_seen_by_health(elasticache_cluster_factory, received) -> None:
    cluster = elasticache_cluster_factory(nodes=2, relay=False)
    failed = received(signals.refresh_failed)
    options = {"REFRESH_INTERVAL": 0.2, "DISCOVERY_TIMEOUT": 1}
    cache = ElastiCache(cluster.location, {"OPTIONS": options})
    cache.set("key", "kept")
    cluster.endpoint.stop()
    call = poll_cache_until(cache, failed)
    assert call["endpoint"] == cluster.location
    assert isinstance(call["error"], EndpointUnreachable)
    assert cache.get("key") == "kept"  # the last good list stays in use
    with override_settings(CACHES=caches_for(cluster.location, **options)):
        report = health.check()
    assert report.status is health.Status.UNREACHABLE
    assert report.process.config_version == 1
    assert report.process.last_error == str(call["error"])


def test_a_receiver_that_raises_does_not_stop_the_others(received, caplog) -> None:
    def broken(**named: Any) -> None:
        raise RuntimeError("receiver bug")

    signals.refresh_failed.connect(broken, weak=False)
    later = received(signals.refresh_failed)
    try:
        signals.send(signals.refresh_failed, object, endpoint="e:1", error=ValueError("x"))
    finally:
        signals.refresh_failed.disconnect(broken)
    assert later.wait()["endpoint"] == "e:1"
    assert "receiver bug" in caplog.text


def health_check_major_version() -> int:
    """django-health-check's major version; 0 when it is not installed."""
    try:
        return int(importlib.metadata.version("django-health-check").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return 0


def run_plugin(**fields: Any) -> Any:
    plugin = importlib.import_module("django_elasticache.contrib.health_check")
    return asyncio.run(plugin.ElastiCache(**fields).get_result()).error


def test_health_check_plugin_checks_every_node_of_every_cache(
    elasticache_cluster_factory,
) -> None:
    if health_check_major_version() < 4:
        # Django 4.2 gets django-health-check 3, whose API the plugin does not support.
        with pytest.raises(ImportError, match="needs django-health-check 4 or later"):
            run_plugin()
        return
    first, second = elasticache_cluster_factory(nodes=2), elasticache_cluster_factory(nodes=2)
    backend = "django_elasticache.memcached.ElastiCache"
    caches = {
        "default": {"BACKEND": backend, "LOCATION": first.location},
        "sessions": {"BACKEND": backend, "LOCATION": second.location},
    }
    with override_settings(CACHES=caches):
        assert run_plugin() is None
        down = second.nodes[1]
        second.kill_node(down)
        warning = run_plugin()
        assert type(warning).__name__ == "ServiceWarning"
        assert "sessions" in warning.message and down.address in warning.message
        assert run_plugin(alias="default") is None
        first.endpoint.stop()
        unavailable = run_plugin(alias="default")
    assert type(unavailable).__name__ == "ServiceUnavailable"
    assert first.location in unavailable.message
